"""Export directories (write, load without training code), checkpoint files and converters."""

from unimodal.checkpoints.convert_orthus import convert_orthus
from unimodal.checkpoints.export import write_export
from unimodal.checkpoints.files import find_latest_checkpoint
from unimodal.checkpoints.load import Exported, load_exported
from unimodal.checkpoints.zero import zero_to_fp32

__all__ = ["Exported", "convert_orthus", "find_latest_checkpoint", "load_exported", "write_export", "zero_to_fp32"]
