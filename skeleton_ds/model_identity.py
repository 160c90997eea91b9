"""What ties an artifact to the base model it was made from.

Every prompt, score file, skeleton and compact checkpoint records the identity of its base model (the
name given and a hash of its architecture config); a later stage, `convert` or `infer` compares it
with the model it is handed and stops with one clear error on a mismatch, instead of running a
prompt on a model it was not tuned for.
"""

from __future__ import annotations

import hashlib
import json

from skeleton_ds import packaged_models
from skeleton_ds.errors import UserError

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                         "_commit_hash", "use_cache"}


def model_identity(name: str, path: str, config, revision: str | None) -> dict:
    """What ties an artifact to its base model: the name given, and a hash of the architecture config
    (shapes and hyper-parameters; not the library version or dtype it was saved with)."""
    shape = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()
    identity = {"name_or_path": name, "resolved_path": path, "config_sha256": digest,
                "revision": revision or getattr(config, "_commit_hash", None)}
    source = packaged_models.source_record(path)
    if source is not None:  # a converted packaged model: its weights are the GGUF it was made from
        identity["weights_sha256"] = source["gguf_sha256"]
    return identity


def directory_config_hash(directory) -> str:
    """The config hash of the model saved in `directory` (a compact checkpoint's own identity)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return model_identity(str(directory), str(directory), config, None)["config_sha256"]


def check_identity(recorded: dict, actual: dict, what: str) -> None:
    if recorded.get("config_sha256") != actual["config_sha256"]:
        raise UserError(f"{what} was made for base model {recorded.get('name_or_path')!r}, "
                        f"not {actual['name_or_path']!r} "
                        f"(config hashes differ): pass the same --model, or redo the stage with --overwrite")
