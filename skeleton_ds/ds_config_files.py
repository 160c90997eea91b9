"""The DeepSpeed configs that ship with skeleton_ds, and what `--config` names.

The JSON files live once, in the checkout's top-level ds_configs/ (users run
`deepspeed launch/train.py --config ds_configs/zero3.json` from a checkout); pyproject.toml maps that
folder into the wheel as skeleton_ds/ds_configs, so an installed package finds them beside its code.
"""

from __future__ import annotations

from pathlib import Path

from skeleton_ds.errors import UserError

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_SPELLING = Path("ds_configs")


def packaged_dir() -> Path:
    """The shipped configs: inside the installed package (a wheel), else the checkout's ds_configs/
    (a checkout or an editable install, where the package directory is skeleton_ds/ itself)."""
    installed = _PACKAGE / "ds_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "ds_configs"


def packaged_names() -> list[str]:
    """Names `--config` accepts without a path, e.g. zero2 or zero3_offload."""
    return sorted(p.stem for p in packaged_dir().glob("*.json"))


def resolve_config_path(value: str | Path) -> Path:
    """The file `--config VALUE` means. A path that exists wins; otherwise a bare name (zero3 or
    zero3.json) or the checkout spelling ds_configs/zero3.json names a packaged config, so the same
    flag works in a checkout and with the package installed anywhere."""
    path = Path(value)
    if path.is_file():
        return path
    if path.parent in (Path("."), _CHECKOUT_SPELLING) and not path.is_dir():
        packaged = packaged_dir() / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if packaged.is_file():
            return packaged
    what = "is a directory" if path.is_dir() else "does not exist"
    raise UserError(f"DeepSpeed config {value} {what}: give the path of a JSON file, or a packaged config by "
                    f"name: {', '.join(packaged_names())}")
