"""Run the Skeleton pipeline stages under DeepSpeed ZeRO (prompt, attribute, localize, convert, retune).

    deepspeed launch/train.py --config ds_configs/zero3.json --model minilm --task sst2 --output runs/sst2
    deepspeed --num_gpus 2 launch/train.py --config ds_configs/zero3.json ...   # 2 ranks (gloo CPU ranks if no GPU)
    python launch/train.py --config ds_configs/zero2.json ...                   # one process, no launcher

Same as `skeleton-ds train ...`; `--help` lists every flag. `--stages` picks a subset; the stages are
skeleton_ds/stages/*.py, run in order by skeleton_ds/stages/pipeline.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import run_and_exit, train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_and_exit(train, sys.argv[1:]))
