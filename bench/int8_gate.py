"""Would `scaleseg export --quantize int8` ship the INT8 graphs of trained models? For each run folder, the
package is exported exactly as the command does (FP32 graphs, parity check, ONNX Runtime static quantization,
the gate's measurement on the val images), with the gate opened so that every graph's label agreement and mIoU
change are recorded; the table then says whether the default gate (99 % agreement, at most 0.5 mIoU lost)
would have written it. Packages go to a temporary folder and are deleted."""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, markdown_table, write_results  # noqa: E402
from export.onnx_export import ExportError  # noqa: E402
from export.package import export_package  # noqa: E402
from export.quantize import CONFIDENT, DEFAULT_CALIB_COUNT, DEFAULT_METHOD, METHODS, Gate, gate_verdict  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402


def run_label(run: Path) -> str:
    """A run folder's last three parts (the study's fraction/method/seed), which name it in the table."""
    return "/".join(run.resolve().parts[-3:])


def gate_rows(run: Path, data: Path | None, cif_scales: tuple[float, ...], calib_count: int, calib_method: str,
              work: Path) -> list[dict]:
    """One row per graph of ``run``'s last.pt: agreement, mIoU FP32 -> INT8, and the default gate's verdict."""
    checkpoint = run / "last.pt"
    has_cif = load_checkpoint(checkpoint)["inference"]["cif"]
    meta = export_package(checkpoint, work / f"{run_label(run).replace('/', '-')}-{calib_method}",
                          cif_scales=cif_scales if has_cif else None, data=data, quantize="int8", calib_count=calib_count,
                          calib_method=calib_method, int8_gate=Gate(min_agreement=0.0, max_miou_drop=math.inf),
                          progress=lambda line: print(" ", line))
    rows = []
    for graph, measured in meta["int8"]["gate"]["graphs"].items():
        verdict = gate_verdict(measured["label_agreement"], measured["miou_fp32"], measured["miou_int8"], Gate())
        rows.append({"run": run_label(run), "backbone": meta["backbone"], "decoder": meta["decoder"],
                     "calibration": calib_method, "graph": graph,
                     "images": measured["images"], "label_agreement_pct": 100 * verdict["label_agreement"],
                     "miou_fp32": verdict["miou_fp32"], "miou_int8": verdict["miou_int8"],
                     "miou_change": -verdict["miou_drop"], "ships": "yes" if verdict["passed"] else "no",
                     "uncertain_pct": 100 * measured["uncertain_share"],
                     "agreement_confident_pct": None if measured["agreement_confident"] is None
                     else 100 * measured["agreement_confident"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="training run folders, each with a last.pt")
    p.add_argument("--data", type=Path, help="dataset whose val images gate and whose unlabelled images calibrate "
                                             "(default: each checkpoint's own training data)")
    p.add_argument("--cif-scales", default="0.5,2.0", help="scales fused with 1.0 in the CIF graph of CIF checkpoints")
    p.add_argument("--calib-count", type=int, default=DEFAULT_CALIB_COUNT, help="unlabelled images that calibrate")
    p.add_argument("--calib-methods", default=DEFAULT_METHOD, help=f"comma-separated, each of {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", default="int8_gate", help="results file name (bench/results/NAME.json / .md)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "last.pt").is_file()]
    if missing:
        raise SystemExit(f"no last.pt in {', '.join(missing)}: give folders of finished `scaleseg train` runs.")
    calib_methods = args.calib_methods.split(",")
    unknown = [m for m in calib_methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--calib-methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}.")
    torch.set_num_threads(args.threads)
    cif_scales = tuple(float(s) for s in args.cif_scales.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaleseg-int8-gate-") as work:
        for i, run in enumerate(args.runs, 1):
            for method in calib_methods:
                print(f"[{i}/{len(args.runs)}] {run}, {method} calibration", flush=True)
                try:
                    found = gate_rows(run, args.data, cif_scales, args.calib_count, method, Path(work))
                except ExportError as err:  # e.g. percentile calibration on an empty CIF tensor: a result too
                    found = [{"run": run_label(run), "calibration": method, "ships": f"no: {err}"}]
                print(*found, sep="\n", flush=True)
                rows += found
    table = markdown_table(rows, [("run", "run"), ("backbone", "backbone"), ("decoder", "decoder"),
                                  ("calibration", "calibration"), ("graph", "INT8 graph"),
                                  ("images", "val images"), ("label_agreement_pct", "label agreement %"),
                                  ("uncertain_pct", f"pixels FP32 labels below {CONFIDENT} confidence %"),
                                  ("agreement_confident_pct", "agreement on the rest %"),
                                  ("miou_fp32", "mIoU FP32"), ("miou_int8", "mIoU INT8"), ("miou_change", "change"),
                                  ("ships", "default gate ships it")])
    write_results(args.name, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                              "gate": vars(Gate()), "rows": rows}, table,
                  f"`export_package(..., quantize=\"int8\")` with {args.calib_count} calibration images, "
                  f"the gate's val images at their own size; 'ships' applies the default gate "
                  f"({100 * Gate().min_agreement:.0f} % label agreement, at most {Gate().max_miou_drop} mIoU lost).",
                  results=args.results, script="int8_gate")


if __name__ == "__main__":
    main()
