"""The command line every demo shares, and the run context it produces.

Flags: --quick (CI smoke run, about a minute on 2 CPU cores), --device auto|cpu|cuda|mps, --seed,
--out DIR (where figures/ and results.json go), --show (also open each figure in a window).

Default --out: a full run writes into the topic's own folder, refreshing the committed figures/
and results.json that its README shows; a --quick run writes under the system temp folder so it
never overwrites them.
"""

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plotting import save_figure
from results import load_average, write_results
from runtime import DEVICE_CHOICES, describe_device, pick_device, seed_everything


def demo_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared demo flags; a demo may add its own before parsing."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (about a minute on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto picks cuda > mps > cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder for figures/ and results.json (default: the topic folder for a full "
                             "run, a temp folder for --quick)")
    parser.add_argument("--show", action="store_true", help="also show each figure in a window")
    return parser


@dataclass
class DemoRun:
    """What a demo needs once its arguments are parsed: device, output paths, and bookkeeping."""

    topic: str
    device: torch.device
    out_dir: Path
    quick: bool
    seed: int
    show: bool = False
    figures: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    load_at_start: float | None = field(default_factory=load_average)  # shared cores show up here

    @property
    def figure_dir(self) -> Path:
        return self.out_dir / "figures"

    def save(self, fig, name: str) -> Path:
        """Save a figure as figures/<name>.png and remember it for the summary."""
        path = save_figure(fig, self.figure_dir / f"{name}.png", show=self.show)
        self.figures.append(path)
        print(f"  figure: {path}")
        return path

    def finish(self, results: dict, filename: str = "results.json") -> Path:
        """Write results.json (numbers + environment) and print where everything went. A partial run (a
        demo's --only, a benchmark script) passes its own filename so it never overwrites the full run's."""
        seconds = time.perf_counter() - self.started
        path = write_results(self.out_dir / filename, results, self.device, load_at_start=self.load_at_start,
                             topic=self.topic, quick=self.quick, seed=self.seed, seconds=round(seconds, 2),
                             figures=[p.name for p in self.figures])
        print(f"\n{self.topic}: {len(self.figures)} figures and {path} written in {seconds:.1f} s")
        return path


def start_demo(args: argparse.Namespace, demo_file: str) -> DemoRun:
    """Seed everything, choose the device and the output folder; print a one-line header."""
    topic_dir = Path(demo_file).resolve().parent
    out_dir = args.out
    if out_dir is None:
        out_dir = Path(tempfile.gettempdir()) / "llm_lab_quick" / topic_dir.name if args.quick else topic_dir
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    device = pick_device(args.device)
    run = DemoRun(topic=topic_dir.name, device=device, out_dir=out_dir, quick=args.quick, seed=args.seed,
                  show=args.show)
    mode = "quick" if args.quick else "full"
    print(f"{run.topic} ({mode} run) on {device} [{describe_device(device)}], torch {torch.__version__}, "
          f"seed {args.seed}, writing to {out_dir}")
    return run


def report_findings(experiments, first_insights=()) -> tuple[list[str], dict]:
    """Take each experiment's "insights" (sentences) and "verdicts" out of its results, print them after
    `first_insights` (print_findings), and return (insights, verdicts) for results.json."""
    insights = list(first_insights)
    insights += [sentence for experiment in experiments for sentence in experiment.pop("insights", [])]
    verdicts = {name: v for experiment in experiments for name, v in experiment.pop("verdicts", {}).items()}
    print_findings(insights, verdicts)
    return insights, verdicts


def print_findings(insights: list[str], verdicts: dict, heading: str = "Key insights") -> None:
    """Print the insight sentences, then each verdict: {verdict, claim, measured, threshold} or
    {verdict, rule, measured} (the claim is then the verdict's name)."""
    print(f"\n{heading}")
    for sentence in insights:
        print(f"  - {sentence}")
    if verdicts:
        print("\nVerdicts (decided by the thresholds written beside them)")
    for name, v in verdicts.items():
        claim, threshold = (v["claim"], v["threshold"]) if "claim" in v else (name, v["rule"])
        print(f"  - {v['verdict'].upper():7s} {claim}: {v['measured']} [{threshold}]")


def print_table(rows: list[dict], title: str = "") -> None:
    """Print a list of dicts as an aligned text table (floats to 4 significant digits)."""
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_format(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
