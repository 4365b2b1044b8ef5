"""Media codecs behind one interface (``MediaCodec``) and the vocabulary layout."""

from unimodal.modalities.audio import HFAudioCodec, SpeechTokenizerCodec
from unimodal.modalities.base import MediaCodec
from unimodal.modalities.digit_audio import DigitAudioCodec
from unimodal.modalities.image_continuous import ChameleonVQCodec, PixelPatchCodec, VAECodec
from unimodal.modalities.image_discrete import ChameleonImageTokenizer, PatchVQCodec
from unimodal.modalities.loading import load_codec
from unimodal.modalities.seed_tokenizer import SeedImageCodec, SeedTokenizer
from unimodal.modalities.vocab import VocabLayout

__all__ = [
    "ChameleonImageTokenizer",
    "ChameleonVQCodec",
    "DigitAudioCodec",
    "HFAudioCodec",
    "MediaCodec",
    "PatchVQCodec",
    "PixelPatchCodec",
    "SeedImageCodec",
    "SeedTokenizer",
    "SpeechTokenizerCodec",
    "VAECodec",
    "VocabLayout",
    "load_codec",
]
