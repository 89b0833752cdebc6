"""Unit tests of the trade-off report (`client.report`) and the `tlserve report` options: no server.

Points from hand-built profiles and comparisons, the Pareto front, budget
recommendations, the PNG chart (a real image of the requested size) and the
self-contained HTML page.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import pytest

from tlserve.client import cli, pb
from tlserve.client.cli import commands as cli_commands
from tlserve.client.cli import parser as cli_parser
from tlserve.client.cli import render as cli_render
from tlserve.client import report as r

MIB = 1024 * 1024


def variant(runtime: int, precision: int, *, p50_ms: float, size_mib: float, accuracy: float = 0.0,
            memory_mib: float = 0.0, **kw) -> pb.VariantProfile:
    return pb.VariantProfile(
        variant=pb.Variant(runtime=runtime, precision=precision),
        latency_p50_seconds=p50_ms / 1e3,
        latency_p95_seconds=p50_ms * 1.2 / 1e3,
        batch_size=32,
        throughput_images_per_second=32_000 / (p50_ms * 8),
        peak_memory_bytes=int(memory_mib * MIB),
        size_bytes=int(size_mib * MIB),
        parameter_count=11_689_512,
        gflops=1.81,
        test_top1_accuracy=accuracy,
        device="cpu",
        **kw,
    )


@pytest.fixture
def profile() -> pb.ModelProfile:
    """pets:3 with the figures of the issue's example: int8 is the fastest and smallest."""
    return pb.ModelProfile(model=pb.ModelRef(name="pets", version=3), variants=[
        variant(pb.RUNTIME_PYTORCH, pb.PRECISION_FP32, p50_ms=12.1, size_mib=44.7, accuracy=0.921, memory_mib=300),
        variant(pb.RUNTIME_ONNX, pb.PRECISION_FP32, p50_ms=6.3, size_mib=44.7, accuracy=0.920, memory_mib=200,
                accuracy_measured=True, test_image_count=500),
        variant(pb.RUNTIME_ONNX, pb.PRECISION_FP16, p50_ms=4.2, size_mib=22.4),  # accuracy unknown
        variant(pb.RUNTIME_ONNX, pb.PRECISION_INT8, p50_ms=3.1, size_mib=11.2, accuracy=0.912, memory_mib=100),
    ])


@pytest.fixture
def comparison() -> pb.CompareBackbonesResponse:
    def result(name, acc, ms, params, gflops, size, dim):
        return pb.BackboneComparison(backbone=name, probe_accuracy=acc, latency_p50_seconds=ms / 1e3,
                                     parameter_count=params, gflops=gflops, file_size_bytes=size,
                                     weights="NONE", image_size=224, feature_dim=dim, device="cpu")
    return pb.CompareBackbonesResponse(
        results=[
            result("resnet50", 0.88, 25.0, 25_557_032, 4.09, 102_530_333, 2048),
            result("resnet18", 0.83, 7.5, 11_689_512, 1.81, 46_830_571, 512),
            result("mobilenet_v3_small", 0.74, 1.9, 2_542_856, 0.06, 9_829_268, 576),
        ],
        dataset_id="ds1", class_count=4, chance_accuracy=0.25, train_image_count=80, val_image_count=40,
    )


def pt(label: str, accuracy: float | None, ms: float | None, size_mib: float | None = 10.0,
       memory_mib: float | None = None, kind: str = r.MODEL) -> r.Point:
    return r.Point(
        label=label, kind=kind, accuracy=accuracy,
        latency_seconds=None if ms is None else ms / 1e3,
        size_bytes=None if size_mib is None else int(size_mib * MIB),
        peak_memory_bytes=None if memory_mib is None else int(memory_mib * MIB),
    )


# --- points and table rows ----------------------------------------------------------


def test_points_from_a_profile_carry_its_figures_and_variant_labels(profile):
    points = r.points_from_profile(profile)
    assert [p.label for p in points] == [
        "pets:3 pytorch", "pets:3 onnx fp32", "pets:3 onnx fp16", "pets:3 onnx int8"]
    int8 = points[3]
    assert (int8.kind, int8.name, int8.variant, int8.device) == (r.MODEL, "pets:3", "onnx int8", "cpu")
    assert int8.accuracy == pytest.approx(0.912)
    assert int8.latency_seconds == pytest.approx(0.0031)
    assert int8.size_bytes == int(11.2 * MIB) and int8.peak_memory_bytes == 100 * MIB
    assert int8.parameter_count == 11_689_512 and int8.gflops == pytest.approx(1.81)
    # Zeros from the server are unknowns, never free.
    fp16 = points[2]
    assert fp16.accuracy is None and fp16.peak_memory_bytes is None and fp16.note == "accuracy unknown"
    assert points[1].note == "top-1 measured on 500 test images"
    assert points[0].note == "top-1 stored at training" and points[3].note == "top-1 stored at export"


def test_table_rows_of_a_known_model_show_its_figures(profile):
    rows = {(row[0], row[1]): dict(zip(r.TABLE_HEADERS, row)) for row in cli_commands.profile_rows(profile)}
    assert cli_commands.REPORT_HEADERS == r.TABLE_HEADERS
    int8 = rows["pets:3", "onnx int8"]
    assert int8["p50 ms"] == "3.10" and int8["p95 ms"] == "3.72"
    assert int8["size"] == "11.2 MB" and int8["peak mem"] == "100.0 MB"
    assert int8["params (M)"] == "11.7" and int8["GFLOPs"] == "1.81"
    assert int8["accuracy"] == "91.20%" and int8["batch"] == "32" and int8["device"] == "cpu"
    assert int8["pareto"] == "yes"
    assert rows["pets:3", "onnx fp16"]["accuracy"] == "-" and rows["pets:3", "onnx fp16"]["pareto"] == ""
    assert rows["pets:3", "pytorch"]["pareto"] == "yes"  # 92.1%: the most accurate, however slow
    # Table rendering right-aligns the figures.
    table = cli_render.render_table(cli_commands.REPORT_HEADERS, cli_commands.profile_rows(profile))
    assert "91.20%" in table and "44.7 MB" in table


def test_points_from_a_comparison_are_backbone_probes(comparison):
    points = r.points_from_comparison(comparison)
    assert [p.label for p in points] == ["resnet50 (probe)", "resnet18 (probe)", "mobilenet_v3_small (probe)"]
    resnet18 = points[1]
    assert (resnet18.kind, resnet18.name, resnet18.variant) == (r.BACKBONE, "resnet18", "probe")
    assert resnet18.accuracy == pytest.approx(0.83) and resnet18.latency_seconds == pytest.approx(0.0075)
    assert resnet18.size_bytes == 46_830_571 and resnet18.peak_memory_bytes is None
    assert "weights NONE" in resnet18.note and "512-d" in resnet18.note and "40 val images" in resnet18.note
    row = dict(zip(r.TABLE_HEADERS, r.table_rows(points)[1]))
    assert (row["name"], row["variant"], row["accuracy"], row["size"], row["p50 ms"]) == (
        "resnet18", "probe", "83.00%", "44.7 MB", "7.50")


@pytest.mark.parametrize(
    "runtime, precision, label",
    [(pb.RUNTIME_PYTORCH, pb.PRECISION_FP32, "pytorch"), (pb.RUNTIME_PYTORCH, 0, "pytorch"),
     (pb.RUNTIME_ONNX, pb.PRECISION_FP32, "onnx fp32"), (pb.RUNTIME_ONNX, 0, "onnx fp32"),
     (0, pb.PRECISION_FP16, "onnx fp16"), (pb.RUNTIME_ONNX, pb.PRECISION_INT8, "onnx int8")],
)
def test_variant_labels(runtime, precision, label):
    assert r.variant_label(pb.Variant(runtime=runtime, precision=precision)) == label


# --- Pareto front ---------------------------------------------------------------------


def labels(points):
    return [p.label for p in points]


def test_dominated_points_are_off_the_front_and_the_front_is_fastest_first():
    points = [pt("slow-good", 0.95, 20), pt("fast-ok", 0.80, 2), pt("dominated", 0.79, 5), pt("mid", 0.90, 8)]
    assert labels(r.pareto_front(points)) == ["fast-ok", "mid", "slow-good"]


def test_equal_points_are_both_on_the_front_and_a_tie_in_one_figure_is_dominated():
    points = [pt("a", 0.9, 5), pt("a-twin", 0.9, 5), pt("same-acc-slower", 0.9, 6), pt("same-ms-worse", 0.8, 5)]
    assert labels(r.pareto_front(points)) == ["a", "a-twin"]


def test_points_without_accuracy_or_latency_are_never_on_the_front():
    points = [pt("unknown-acc", None, 1), pt("unknown-ms", 0.99, None), pt("known", 0.5, 10)]
    assert labels(r.pareto_front(points)) == ["known"]
    assert r.pareto_front([pt("unknown", None, 1)]) == []


# --- recommendation ------------------------------------------------------------------


def test_latency_budget_picks_the_most_accurate_fitting_variant_and_names_those_passed_over(profile):
    rec = r.recommend(r.points_from_profile(profile), max_latency_seconds=0.005)
    assert rec.point is not None and rec.point.label == "pets:3 onnx int8"
    assert rec.reason.startswith("pets:3 onnx int8: 91.2% top-1 at 3.1 ms p50, 11.2 MB — "
                                 "the most accurate variant within 5 ms")
    assert "pets:3 onnx fp32 (92.0%) needs 6.3 ms" in rec.reason
    assert "pets:3 pytorch (92.1%) needs 12.1 ms" in rec.reason
    assert [p.label for p, _ in rec.passed_over] == ["pets:3 pytorch", "pets:3 onnx fp32"]
    # fp16 fits the budget but its accuracy is unknown: said, not recommended.
    assert "accuracy unknown: pets:3 onnx fp16 fits too" in rec.reason


def test_size_budget_alone():
    points = [pt("big", 0.95, 3, size_mib=100), pt("medium", 0.90, 9, size_mib=40), pt("small", 0.80, 1, size_mib=5)]
    rec = r.recommend(points, max_size_bytes=50 * MIB)
    assert rec.point.label == "medium"
    assert "within 50 MB" in rec.reason and "big (95.0%) is 100.0 MB" in rec.reason


def test_latency_and_size_budgets_together_say_which_budget_each_breaks():
    points = [pt("fp32", 0.92, 6.3, size_mib=44.7), pt("fp16", 0.918, 4.0, size_mib=22.4),
              pt("int8", 0.912, 3.1, size_mib=11.2)]
    rec = r.recommend(points, max_latency_seconds=0.005, max_size_bytes=20 * MIB)
    assert rec.point.label == "int8"
    assert "within 5 ms and 20 MB" in rec.reason
    assert "fp32 (92.0%) needs 6.3 ms and is 44.7 MB" in rec.reason
    assert "fp16 (91.8%) is 22.4 MB" in rec.reason and "fp16 (91.8%) needs" not in rec.reason


def test_memory_budget_treats_unmeasured_memory_as_not_fitting():
    points = [pt("no-mem", 0.99, 1, memory_mib=None), pt("measured", 0.9, 2, memory_mib=100)]
    rec = r.recommend(points, max_memory_bytes=512 * MIB)
    assert rec.point.label == "measured"
    assert "no-mem (99.0%) has no peak memory measured" in rec.reason
    assert "512 MB peak memory" in rec.reason


def test_ties_go_to_the_faster_then_the_smaller():
    points = [pt("slow", 0.9, 5, size_mib=1), pt("fast-big", 0.9, 2, size_mib=50), pt("fast-small", 0.9, 2, size_mib=9)]
    assert r.recommend(points, max_latency_seconds=1.0).point.label == "fast-small"


def test_nothing_fits_names_the_closest_miss():
    points = [pt("far", 0.95, 40), pt("near", 0.85, 6), pt("nearish", 0.90, 9)]
    rec = r.recommend(points, max_latency_seconds=0.005)
    assert rec.point is None
    assert rec.reason == "No variant with a known accuracy fits within 5 ms; the closest is near (85.0%) needs 6.0 ms."


def test_unknown_accuracy_is_never_recommended_and_the_reason_says_so():
    points = [pt("fast-unknown", None, 1), pt("slow-known", 0.9, 30)]
    rec = r.recommend(points, max_latency_seconds=0.005)
    assert rec.point is None
    assert "closest is slow-known" in rec.reason and "accuracy unknown: fast-unknown fits too" in rec.reason
    rec = r.recommend([pt("x", None, 1), pt("y", None, 2)], max_latency_seconds=0.005)
    assert rec.point is None and "accuracy of every variant is unknown (x, y)" in rec.reason


def test_backbone_probes_are_recommended_as_backbones(comparison):
    rec = r.recommend(r.points_from_comparison(comparison), max_latency_seconds=0.010)
    assert rec.point.label == "resnet18 (probe)"
    assert "83.0% probe accuracy" in rec.reason and "the most accurate backbone within 10 ms" in rec.reason
    assert "resnet50 (probe, 88.0%) needs 25.0 ms" in rec.reason


def test_without_a_budget_the_most_accurate_is_recommended():
    rec = r.recommend([pt("a", 0.7, 1), pt("b", 0.8, 9)])
    assert rec.point.label == "b" and "(no budget given)" in rec.reason


def test_budgets_must_be_positive():
    with pytest.raises(ValueError, match="max_latency_seconds"):
        r.recommend([pt("a", 0.7, 1)], max_latency_seconds=0)


# --- chart -------------------------------------------------------------------------

@pytest.fixture
def open_png():
    """Opens PNG bytes with PIL; skips where the chart's libraries are missing."""
    pytest.importorskip("matplotlib")
    image_module = pytest.importorskip("PIL.Image")

    def open_(data: bytes):
        image = image_module.open(io.BytesIO(data))
        image.load()
        return image

    return open_


@pytest.mark.parametrize("width, height, dpi", [(1200, 750, 100), (1000, 617, 96), (640, 480, 150)])
def test_png_is_a_valid_image_of_exactly_the_requested_size(open_png, profile, comparison, width, height, dpi):
    points = r.points_from_profile(profile) + r.points_from_comparison(comparison)
    rec = r.recommend(points, max_latency_seconds=0.005)
    buffer = io.BytesIO()
    r.render_png(points, buffer, title="pets:3", budget=rec.budget, recommended=rec.point,
                 chance_accuracy=0.25, width_px=width, height_px=height, dpi=dpi)
    image = open_png(buffer.getvalue())
    assert image.format == "PNG" and image.size == (width, height)
    # Not a blank canvas: a chart has many colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_png_with_nothing_plottable_is_still_an_image(open_png, tmp_path):
    path = tmp_path / "empty.png"
    r.render_png([pt("unknown", None, 1)], path, title="nothing", width_px=400, height_px=300)
    assert open_png(path.read_bytes()).size == (400, 300)


def test_png_on_a_wide_latency_span_and_one_point(open_png, tmp_path):
    for points in ([pt("a", 0.5, 0.2, size_mib=1), pt("b", 0.9, 400, size_mib=500)], [pt("only", 0.5, 3)]):
        path = tmp_path / "chart.png"
        r.render_png(points, path, title="span", width_px=800, height_px=500)
        assert open_png(path.read_bytes()).size == (800, 500)


# --- page --------------------------------------------------------------------------


def test_html_is_self_contained_with_the_table_the_chart_and_escaped_labels(open_png, tmp_path, profile):
    points = r.points_from_profile(profile) + [pt("<script>alert(1)</script> & co", 0.5, 2)]
    rec = r.recommend(points, max_latency_seconds=0.005, max_size_bytes=20 * MIB)
    files = r.write_report(points, tmp_path / "out", title="report <b>pets</b>", recommendation=rec,
                           notes=["dataset <x>"])
    assert files.png == str(tmp_path / "out" / "report.png") and files.html == str(tmp_path / "out" / "report.html")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")

    # No external resource, no script.
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert not attr.startswith(("http://", "https://", "//")), attr
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "report &lt;b&gt;pets&lt;/b&gt;" in page and "dataset &lt;x&gt;" in page

    # The chart, embedded, is the PNG written next to it.
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)) == (tmp_path / "out" / "report.png").read_bytes()

    # Every point is a row; the recommendation is there.
    assert page.count("<tr") == len(points) + 1
    assert "<td>pets:3</td><td>onnx int8</td>" in page and "91.20%" in page
    assert 'class="front recommended"' in page
    assert "the most accurate variant within 5 ms and 20 MB" in page
    assert "Generated " in page


def test_html_without_a_chart_has_no_image():
    page = r.render_html([pt("a", 0.5, 2)], title="t")
    assert "<img" not in page and "<td>a</td>" in page


def test_write_report_without_matplotlib_says_how_to_install_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(r.ChartUnavailable, match=re.escape("pip install 'tlserve[report]'")):
        r.write_report([pt("a", 0.5, 2)], tmp_path / "out", title="t")
    assert not (tmp_path / "out").exists()


def test_the_client_imports_matplotlib_only_for_a_chart():
    code = "import sys, tlserve.client.cli, tlserve.client.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- CLI options ---------------------------------------------------------------------


def test_report_parser_accepts_the_report_options():
    args = cli_parser.build_parser().parse_args([
        "report", "pets:3", "flowers", "--remeasure", "--batch-size", "8", "--measure-accuracy",
        "--compare-backbones", "pets", "--backbones", "resnet18, mobilenet_v3_small,", "--weights", "none",
        "--max-images-per-class", "20", "--image-size", "160", "--max-latency-ms", "5", "--max-size-mb", "20",
        "--max-memory-mb", "512", "--out", "out", "--no-chart",
    ])
    assert args.func is cli_commands.cmd_report
    assert args.models == [pb.ModelRef(name="pets", version=3), pb.ModelRef(name="flowers")]
    assert (args.remeasure, args.batch_size, args.measure_accuracy) == (True, 8, True)
    assert (args.compare_backbones, args.weights) == ("pets", "NONE")
    assert args.backbones == ["resnet18", "mobilenet_v3_small"]
    assert (args.max_images_per_class, args.image_size) == (20, 160)
    assert (args.max_latency_ms, args.max_size_mb, args.max_memory_mb) == (5.0, 20.0, 512.0)
    assert (args.out, args.no_chart) == ("out", True)
    budget = cli_commands._report_budget(args)
    assert budget == r.Budget(max_latency_seconds=0.005, max_size_bytes=20 * MIB, max_memory_bytes=512 * MIB)


def test_report_defaults():
    args = cli_parser.build_parser().parse_args(["report"])
    assert args.models == [] and args.compare_backbones is None and args.backbones == []
    assert (args.weights, args.max_images_per_class, args.image_size, args.batch_size) == ("", 0, 0, 0)
    assert args.out == "tlserve-report" and not args.no_chart and not args.remeasure
    assert not cli_commands._report_budget(args).given


@pytest.mark.parametrize(
    "argv",
    [["report", "--max-latency-ms", "0"], ["report", "--max-size-mb", "-1"], ["report", "--max-memory-mb", "nan"],
     ["report", "--weights", "imagenet"], ["report", "bad name"]],
)
def test_bad_report_options_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_probe_options_without_compare_backbones_are_a_usage_error(capsys):
    args = cli_parser.build_parser().parse_args(["report", "--backbones", "resnet18"])
    assert cli_commands.cmd_report(None, args) == 2  # refused before any call
    assert "--compare-backbones" in capsys.readouterr().err
