"""`dlm ckpt convert`: re-shard a checkpoint for another tensor/pipeline layout, offline.

    dlm ckpt convert runs/big/checkpoints/step_00001000 --tp 1 --pp 1 --out runs/small/checkpoints

The trainer can resume any checkpoint in any layout (it re-slices on load), so conversion is not
required to change layouts; it writes, ahead of time, the files a target layout reads, one per
(pipeline stage, TP rank), as DeepSpeed would partition the layers. `--tp 1 --pp 1` gives a
consolidated single-file checkpoint (what export reads). The result is a complete checkpoint
(marker, `latest`), with the config's parallel sizes set to the target layout; optimizer state,
step, LR schedule and data position carry over unchanged, so training continues where it was.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml

from pretrain.checkpoint.format import (
    COMMON,
    KINDS,
    CheckpointReader,
    trainer_state_file,
    write_rank_shard,
)
from pretrain.checkpoint.manager import LATEST, load_trainer_state, seal, verify_checkpoint
from pretrain.checkpoint.marker import add_no_verify_argument, atomic_write_text
from pretrain.checkpoint.records import write_record
from pretrain.config.loader import from_dict, load_yaml_text
from pretrain.config.schema import Config
from pretrain.errors import CheckpointError
from pretrain.model.sharding import shard_spec
from pretrain.parallel.topology import Topology


def stage_names(names: set[str], num_layers: int, pp: int) -> list[list[str]]:
    """Canonical names per pipeline stage, split as DeepSpeed's `type:` partition does."""
    from deepspeed.runtime.utils import partition_balanced

    # layer list: [embedding, layer 0 .. layer N-1, head]; only transformer layers weigh
    parts = partition_balanced([0] + [1] * num_layers + [0], pp)

    def stage_of(name: str) -> int:
        if name.startswith("embedding."):
            index = 0
        elif name.startswith("head."):
            index = num_layers + 1
        else:
            index = int(name.split(".")[1]) + 1
        return next(s for s in range(pp) if parts[s] <= index < parts[s + 1])

    stages: list[list[str]] = [[] for _ in range(pp)]
    for name in sorted(names):
        stages[stage_of(name)].append(name)
    return stages


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, *, tp: int, pp: int, verify: bool = True
) -> Path:
    """Write `src` re-sharded for TP=`tp` x PP=`pp` as `<out_dir>/<step tag>`; update `latest`.
    `verify=False` skips the content hashes of `src` (file set and sizes are still checked)."""
    src, out_dir = Path(src), Path(out_dir)
    verify_checkpoint(src, hashes=verify)
    config_file = src / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{src}: no config.yaml; cannot tell the model it holds")
    data = load_yaml_text(config_file.read_text(), str(config_file))
    data.setdefault("parallel", {}).update(tensor_parallel=tp, pipeline_parallel=pp)
    cfg: Config = from_dict(Config, data, source=str(config_file))
    cfg.validate()
    Topology(tp=tp, pp=pp, dp=1).validate(cfg.model, zero_stage=cfg.parallel.zero_stage)
    reader = CheckpointReader(src)
    final = out_dir / src.name
    if final.resolve() == src.resolve():
        raise CheckpointError(f"{src}: --out must not be the checkpoint's own directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f"{src.name}.partial."))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; checkpoints are meant to be shared
        _write_layout(reader, staging, cfg.model.num_layers, tp, pp)
        write_record(staging / trainer_state_file(0), load_trainer_state(src, 0))
        seal(staging, final, int(reader.common["step"]), yaml.safe_dump(data, sort_keys=False))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left over when something failed
    atomic_write_text(out_dir / LATEST, final.name + "\n")
    return final


def _write_layout(reader: CheckpointReader, staging: Path, num_layers: int, tp: int, pp: int):
    """The shard files of a TP=`tp` x PP=`pp` layout and its common record, into `staging`."""
    topo = Topology(tp=tp, pp=pp, dp=1)
    for stage, names in enumerate(stage_names(reader.names(), num_layers, pp)):
        for tp_rank in range(tp):
            tensors, meta = {}, {}
            for name in names:
                if shard_spec(name).dim is None and tp_rank != 0:
                    continue  # replicated: TP rank 0 holds it, as in a training run
                for kind in KINDS:
                    tensors[f"{name}#{kind}"] = reader.local(name, kind, tp_rank, tp).contiguous()
                meta[name] = {"tp_rank": tp_rank, "tp_size": tp}
            rank = stage * topo.tp * topo.dp + tp_rank  # coordinates (stage, dp 0, tp_rank)
            write_rank_shard(staging, rank, tensors, meta)
    write_record(staging / COMMON, dict(reader.common, layout={"tp": tp, "pp": pp, "dp": 1}))


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a complete checkpoint directory (step_XXXXXXXX)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="checkpoints directory to write into (e.g. runs/NAME/checkpoints); gets the "
        "converted step_XXXXXXXX and a `latest` pointing at it",
    )
    parser.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    parser.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    add_no_verify_argument(parser)


def run_convert(args: argparse.Namespace) -> int:
    final = convert_checkpoint(
        args.checkpoint, args.out, tp=args.tp, pp=args.pp, verify=not args.no_verify
    )
    print(f"wrote {final} (tp={args.tp} pp={args.pp})")
    return 0
