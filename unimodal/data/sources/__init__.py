"""Converters from raw material on this machine to the unimodal source JSONL."""
