"""Media codecs behind one interface (``MediaCodec``) and the vocabulary layout."""

from unimodal.specs import lazy_exports

_EXPORTS = {
    "ChameleonImageTokenizer": "unimodal.modalities.image_discrete.ChameleonImageTokenizer",
    "ChameleonVQCodec": "unimodal.modalities.image_continuous.ChameleonVQCodec",
    "DigitAudioCodec": "unimodal.modalities.digit_audio.DigitAudioCodec",
    "HFAudioCodec": "unimodal.modalities.audio.HFAudioCodec",
    "MediaCodec": "unimodal.modalities.base.MediaCodec",
    "PatchVQCodec": "unimodal.modalities.image_discrete.PatchVQCodec",
    "PixelPatchCodec": "unimodal.modalities.image_continuous.PixelPatchCodec",
    "SeedImageCodec": "unimodal.modalities.seed_tokenizer.SeedImageCodec",
    "SeedTokenizer": "unimodal.modalities.seed_tokenizer.SeedTokenizer",
    "SpeechTokenizerCodec": "unimodal.modalities.audio.SpeechTokenizerCodec",
    "VAECodec": "unimodal.modalities.image_continuous.VAECodec",
    "VocabLayout": "unimodal.modalities.vocab.VocabLayout",
    "load_codec": "unimodal.modalities.loading.load_codec",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
