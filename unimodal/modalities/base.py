"""The interface every media codec implements (image VAEs, VQ tokenizers, RVQ audio codecs...).

The data pipeline calls ``encode`` on decoded parts (uint8 pixels, waveforms) to get the array
the model consumes: float features ``[n, d]`` for continuous modalities, integer codes for
discrete ones. ``fingerprint`` identifies the codec so that data encoded by one codec is never
trained with another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unimodal.data.schema import Part


class MediaCodec:
    modality: str = ""

    def encode(self, part: Part) -> np.ndarray:
        raise NotImplementedError

    def decode(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        return {"name": type(self).__name__}

    def __call__(self, part: Part) -> np.ndarray:
        return self.encode(part)
