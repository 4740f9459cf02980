"""The names inside a wemoe output directory, shared by every module that writes or reads one."""

FORMAT = "wemoe"
CONFIG_FILE = "config.json"
RECORD_FILE = "wemoe.json"  # the record, when config.json is the model's own (transformers folders)
HEADS_FILE = "heads.safetensors"
REPORT_FILE = "report.json"
CARD_FILE = "README.md"
# The record section that describes a mixture-of-experts module (``wemoe.load`` rebuilds it from this
# section and the tensors); an output without it is a plain checkpoint in the base's key scheme.
MOE_SECTION = "wemoe"

__all__ = ["CARD_FILE", "CONFIG_FILE", "FORMAT", "HEADS_FILE", "MOE_SECTION", "RECORD_FILE", "REPORT_FILE"]
