"""Shards, chat data, the Processor, packing and the data modules."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "ImageTextPairs": "unimodal.data.pairs.ImageTextPairs",
    "Packer": "unimodal.data.packing.Packer",
    "Processor": "unimodal.data.processor.Processor",
    "ShardSet": "unimodal.data.datamodule.ShardSet",
    "UnimodalDataModule": "unimodal.data.datamodule.UnimodalDataModule",
    "encode_shards": "unimodal.data.pre_encode.encode_shards",
    "pack_jsonl": "unimodal.data.jsonl.pack_jsonl",
    "read_documents": "unimodal.data.shards.read_documents",
    "write_documents": "unimodal.data.shards.write_documents",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
