"""The trade-off report behind `tlserve report`: points, Pareto front, budgets, chart, page.

Every model variant a profile measured (`ModelProfile`) and every backbone a
linear probe scored (`CompareBackbonesResponse`) becomes one `Point`: accuracy,
batch-1 p50 latency, size, memory. From a list of points this module finds the
Pareto front (nothing else is both more accurate and faster), recommends the
most accurate point within a latency, size and memory budget and says why, and
renders a PNG chart (accuracy against latency, marker area ∝ size) and one
self-contained HTML page holding the table and the chart:

    points = points_from_profile(tl.profile_model("pets"))
    rec = recommend(points, max_latency_seconds=0.005, max_size_bytes=20 << 20)
    files = write_report(points, "tlserve-report", title="pets", recommendation=rec)

Pure: no gRPC calls, only the generated messages. matplotlib (the `report`
extra) is imported when a chart is drawn and nowhere else, so the client's base
install stays grpcio + protobuf; the chart uses a `Figure` on the Agg canvas,
never pyplot's global state, so reports can be drawn from several threads.
"""

from __future__ import annotations

from tlserve.client.report.chart import (  # noqa: F401 - the package's API
    render_png,
)
from tlserve.client.report.page import (  # noqa: F401 - the package's API
    ReportFiles,
    render_html,
    write_report,
)
from tlserve.client.report.points import (  # noqa: F401 - the package's API
    BACKBONE,
    HTML_NAME,
    INSTALL_HINT,
    MODEL,
    PNG_NAME,
    ChartUnavailable,
    Point,
    front_members,
    fronts,
    model_name,
    pareto_front,
    points_from_comparison,
    points_from_profile,
    variant_label,
)
from tlserve.client.report.budget import (  # noqa: F401 - the package's API
    TABLE_HEADERS,
    Budget,
    Recommendation,
    default_notes,
    format_bytes,
    format_ms,
    recommend,
    table_rows,
)
