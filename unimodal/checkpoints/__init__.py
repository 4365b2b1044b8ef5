"""Export directories (write, load without training code), checkpoint files and converters."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "Exported": "unimodal.checkpoints.load.Exported",
    "convert_orthus": "unimodal.checkpoints.convert_orthus.convert_orthus",
    "find_latest_checkpoint": "unimodal.checkpoints.files.find_latest_checkpoint",
    "load_exported": "unimodal.checkpoints.load.load_exported",
    "write_export": "unimodal.checkpoints.export.write_export",
    "zero_to_fp32": "unimodal.checkpoints.zero.zero_to_fp32",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
