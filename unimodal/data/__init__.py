"""Shards, chat data, the Processor, packing and the data modules."""

from unimodal.data.datamodule import ShardSet, UnimodalDataModule
from unimodal.data.jsonl import pack_jsonl
from unimodal.data.packing import Packer
from unimodal.data.pairs import ImageTextPairs
from unimodal.data.pre_encode import encode_shards
from unimodal.data.processor import Processor
from unimodal.data.shards import read_documents, write_documents

__all__ = [
    "ImageTextPairs",
    "Packer",
    "Processor",
    "ShardSet",
    "UnimodalDataModule",
    "encode_shards",
    "pack_jsonl",
    "read_documents",
    "write_documents",
]
