"""What users look at: `dvc plots show` / `dvc plots diff` of the tiny whole-DAG run (`reproduced`),
as DVC fills the templates (--json) and as a real browser draws the page (headless Chromium)."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from imgcls import paths, plotting
from tools.vendor_vega import admits

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent


def rel(path) -> str:
    return str(path.relative_to(paths.ROOT))


def charts(run: str) -> dict[str, str]:
    """The Vega charts every run has, by what they show: plot id (the data file) in dvc.yaml."""
    return {**{metric: rel(paths.learning_curve(run, metric)) for metric in paths.LEARNING_CURVES},
            "confusion": rel(paths.confusion(run)), "tsne": rel(paths.tsne_points(run))}


def figures(run: str) -> list[str]:
    return [rel(paths.learning_curves_png(run)), rel(paths.confusion_png(run)), rel(paths.tsne_png(run))]


def plots_json(repo, *args) -> dict:
    shown = json.loads(repo.dvc("plots", *args, "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    return shown["data"]


def spec(shown: dict, plot_id: str) -> dict:
    (entry,) = shown[plot_id]
    return entry["content"]


def classes_of(repo, run: str) -> list[str]:
    study = repo.params["train"][run]["data"]
    return repo.params["data"][study]["classes"] or ["alpha", "beta"]  # conftest's ImageFolder default


# ---------------------------------------------------------------- the filled Vega specs
def test_every_run_has_learning_curves_a_square_confusion_matrix_and_its_tsne(reproduced):
    shown = plots_json(reproduced, "show")
    for run in reproduced.params["train"]:
        ids = charts(run)
        assert set(ids.values()) | set(figures(run)) <= set(shown), run
        for metric in paths.LEARNING_CURVES:
            curve = spec(shown, ids[metric])
            rows = curve["data"]["values"]
            assert {row["split"] for row in rows} == {"train", "validation"}
            assert all(isinstance(row["epoch"], int) for row in rows)
            colour, x = curve["encoding"]["color"], curve["encoding"]["x"]
            assert colour["field"] == "split" and colour["scale"]["domain"] == ["train", "validation"]
            assert colour["scale"]["range"] == list(plotting.PALETTE[:2])  # as the PNG's lines
            assert x["field"] == "epoch" and x["axis"]["format"] == "d" and x["axis"]["tickMinStep"] == 1
        confusion = spec(shown, ids["confusion"])
        classes = classes_of(reproduced, run)
        cells = {(row["actual"], row["predicted"]): row["count"] for row in confusion["data"]["values"]}
        assert set(cells) == {(a, p) for a in classes for p in classes}  # square, classes never predicted too
        assert sum(cells.values()) == json.loads((reproduced.root / rel(paths.eval_metrics(run))).read_text())["images"]
        encoding = confusion["spec"]["encoding"]
        assert (encoding["y"]["field"], encoding["x"]["field"]) == ("actual", "predicted")  # true on y, as the PNG
        tsne = spec(shown, ids["tsne"])
        assert tsne["spec"]["encoding"]["color"]["field"] == "class"
        assert tsne["spec"]["encoding"]["color"]["scale"]["range"] == list(plotting.PALETTE)  # as the PNG
        assert {row["class"] for row in tsne["data"]["values"]} <= set(classes)


def test_a_new_run_in_params_gets_its_plots_with_no_edit_to_dvc_yaml(reproduced, tmp_path):
    repo = reproduced.copy(tmp_path / "copy")
    dvc_yaml = (repo.root / "dvc.yaml").read_text()
    train = repo.params["train"]
    repo.set_params(**{"train": {**train, "mnist_seed7": {**train["mnist"], "seed": 7}}})
    repo.dvc("repro", "tsne@mnist_seed7")
    shown = plots_json(repo, "show")
    assert set(charts("mnist_seed7").values()) | set(figures("mnist_seed7")) <= set(shown)
    assert (repo.root / "dvc.yaml").read_text() == dvc_yaml


def test_plots_diff_keeps_the_two_revisions_apart(two_epochs):
    shown = plots_json(two_epochs, "diff", "HEAD~1", "HEAD")
    ids = charts("mnist")
    tsne = spec(shown, ids["tsne"])
    assert tsne["facet"]["row"]["field"] == "rev"  # one row of panels per revision, not overlapping points
    assert len({row["rev"] for row in tsne["data"]["values"]}) == 2
    assert spec(shown, ids["confusion"])["facet"]["column"]["field"] == "rev"
    curve = spec(shown, ids["loss"])
    assert curve["encoding"]["strokeDash"]["field"] == "rev" and curve["encoding"]["color"]["field"] == "split"
    assert {row["epoch"] for row in curve["data"]["values"]} == {1, 2}


# ---------------------------------------------------------------- the page in a browser
def test_the_page_template_inlines_the_pinned_vendored_bundles():
    """Offline: the page carries Vega, Vega-Lite and vega-embed (no CDN), byte for byte the
    npm packages' minified bundles listed in .dvc/plots/vendor/VERSIONS.json, with licenses."""
    import hashlib

    config = (ROOT / ".dvc" / "config").read_text()
    template = re.search(r"html_template\s*=\s*(\S+)", config).group(1)
    page = (ROOT / ".dvc" / template).read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page and "<script src" not in page
    versions = json.loads((ROOT / ".dvc" / "plots" / "vendor" / "VERSIONS.json").read_text())
    inlined = re.findall(r"<script>/\* (\S+)@(\S+) [^\n]*\*/\n(.*?)</script>", page, flags=re.S)
    assert [(name, version) for name, version, _ in inlined] == [(n, v["version"]) for n, v in versions.items()]
    for name, _, bundle in inlined:
        assert hashlib.sha256(bundle.encode()).hexdigest() == versions[name]["sha256"], name
        assert "Redistribution and use" in (ROOT / ".dvc" / "plots" / "vendor" / f"LICENSE-{name}").read_text()
    for package in versions.values():  # vega-embed's (and vega-lite's) peer ranges admit the pinned versions
        for peer, spec in package["peerDependencies"].items():
            assert admits(versions[peer]["version"], spec), (package, peer)


# Injected after the page's scripts load and before its charts: counts each vegaEmbed call's
# outcome, collects errors and warnings, then writes a report that --dump-dom returns.
PROBE = """<script>
(function () {
  const problems = [], calls = [];
  window.addEventListener("error", (e) => problems.push("error: " + e.message));
  for (const level of ["error", "warn"]) {
    const original = console[level];
    console[level] = (...args) => { problems.push(level + ": " + args.join(" ")); original.apply(console, args); };
  }
  const embed = window.vegaEmbed;
  window.vegaEmbed = (el, spec, opts) => {
    const call = embed(el, spec, opts).then((result) => {
      const canvas = document.querySelector(el + " canvas.marks");
      let inked = 0;
      if (canvas && canvas.width && canvas.height) {
        const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 0; i < pixels.length; i += 4) {
          if (pixels[i + 3] && (pixels[i] < 250 || pixels[i + 1] < 250 || pixels[i + 2] < 250)) inked++;
        }
      }
      const leaves = (node) => (node.items || []).reduce((n, item) => n + (item.items ? leaves(item) : 1), 0);
      return {id: el, marks: leaves(result.view.scenegraph().root), inked: inked};
    }, (error) => { problems.push("embed " + el + ": " + error); return {id: el, failed: true}; });
    calls.push(call);
    return call;
  };
  window.addEventListener("load", () => Promise.all(calls).then((results) => {
    const out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify({versions: {vega: vega.version, "vega-lite": vegaLite.version,
                                                 "vega-embed": vegaEmbed.version || embed.version},
                                      charts: results, problems: problems});
    document.body.appendChild(out);
  }));
})();
</script>
"""


def render(page: Path, tmp_path: Path, screenshot: Path | None = None) -> dict:
    """Open the page in headless Chromium with the network off; the probe's report."""
    probed = page.with_name("probed.html")
    text = page.read_text()
    head, body = text.rsplit("</head>", 1)  # the bundles inlined in the head may hold "<body>" in strings
    probed.write_text(head + "</head>" + body.replace("<body>", "<body>\n" + PROBE, 1))
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=60000", "--window-size=1600,3000"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", probed.as_uri()], capture_output=True, timeout=180)
    result = subprocess.run([*args, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, f"the page never finished rendering:\n{result.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


def assert_every_chart_drew(report: dict, expected: int) -> None:
    versions = json.loads((ROOT / ".dvc" / "plots" / "vendor" / "VERSIONS.json").read_text())
    assert report["versions"] == {name: v["version"] for name, v in versions.items()}
    assert report["problems"] == []
    assert len(report["charts"]) == expected
    for chart in report["charts"]:
        assert not chart.get("failed") and chart["marks"] > 0 and chart["inked"] > 500, chart


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian: apt-get install chromium; .ci/run does)")
def test_the_plots_page_draws_every_chart_offline(reproduced, tmp_path):
    reproduced.dvc("plots", "show", "-o", str(tmp_path / "show"))
    shown = plots_json(reproduced, "show")
    vega = [plot_id for plot_id, entries in shown.items() if entries[0]["type"] == "vega"]
    assert set(vega) == {plot_id for run in reproduced.params["train"] for plot_id in charts(run).values()}
    assert_every_chart_drew(render(tmp_path / "show" / "index.html", tmp_path, tmp_path / "show.png"), len(vega))


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian: apt-get install chromium; .ci/run does)")
def test_the_plots_diff_page_draws_every_chart_offline(two_epochs, tmp_path):
    two_epochs.dvc("plots", "diff", "HEAD~1", "HEAD", "--targets", *charts("mnist").values(), "-o", str(tmp_path / "diff"))
    assert_every_chart_drew(render(tmp_path / "diff" / "index.html", tmp_path, tmp_path / "diff.png"),
                            len(charts("mnist")))


def test_dvc_yaml_declares_plots_per_stage_not_per_run():
    """Issue 13: hand-written per-run entries missed runs; the foreach stages declare them."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "plots" not in pipeline
    for stage in ("train", "embed", "tsne"):
        declared = [next(iter(p)) if isinstance(p, dict) else p for p in pipeline["stages"][stage]["do"]["plots"]]
        assert all("${key}" in path for path in declared), declared
