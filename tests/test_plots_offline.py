"""`dvc plots show` writes a page that works offline: the repo's .dvc/config names .dvc/plots/offline.html,
which inlines the vendored Vega, Vega-Lite and vega-embed instead of DVC's CDN <script src> tags."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachelora.plots_template import TEMPLATE, VENDOR_DIR, VENDORED, library_js, render

REPO = Path(__file__).resolve().parents[1]
LOSS = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.6}, {"step": 2, "loss": 0.45}]
DVC_YAML = "plots:\n  - loss.json:\n      x: step\n      y: loss\n"
SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)
CDN_SRC = re.compile(r"https://cdn\.jsdelivr\.net/npm/(vega|vega-lite|vega-embed)@([0-9.]+)")


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    home = cwd.parent / "dvc-home"  # no user or system DVC config (nor site cache) leaks in or out
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(home / "global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "system"),
        "DVC_SITE_CACHE_DIR": str(home / "site"),
    }
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def plots_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repo with this repo's .dvc/config and .dvc/plots/, and one plot on a small JSON."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    (root / "loss.json").write_text(json.dumps(LOSS), encoding="utf-8")
    (root / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    return root


def show(root: Path) -> str:
    dvc(root, "plots", "show")
    return (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")


def test_plots_show_page_inlines_vega_and_loads_nothing(plots_repo):
    html = show(plots_repo)
    assert SCRIPT_SRC.findall(html) == [], "the page loads scripts from elsewhere"
    assert not re.search(r"<script[^>]*https?://", html, re.IGNORECASE)
    for name, version in VENDORED.items():
        assert f"/* {name} {version} */" in html
        assert library_js(name, REPO / VENDOR_DIR) in html, f"{name} {version} is not inlined whole"
    assert '<div id = "loss_json">' in html
    assert "vegaEmbed('#loss_json', spec);" in html
    assert '"loss": 0.45' in html  # the plot's data made it into the spec
    assert not any(p in html for p in ("{plot_divs}", "{scripts}", "{refresh_tag}"))


def test_without_the_config_line_the_page_needs_the_cdn(plots_repo):
    """The control: DVC's default page loads the three libraries from jsDelivr, at the versions vendored."""
    dvc(plots_repo, "config", "--unset", "plots.html_template")
    html = show(plots_repo)
    assert '<div id = "loss_json">' in html
    assert "vegaEmbed" not in html.split('<div id = "loss_json">')[0]  # no library code: only <script src>
    assert dict(CDN_SRC.findall(" ".join(SCRIPT_SRC.findall(html)))) == VENDORED


def test_committed_template_matches_the_vendored_files(monkeypatch):
    monkeypatch.chdir(REPO)
    assert TEMPLATE.read_text(encoding="utf-8") == render(), "stale: run `python -m cachelora.plots_template`"


@pytest.mark.skipif(shutil.which("node") is None, reason="no node")
def test_inlined_libraries_render_the_plot_in_node(plots_repo):
    """Runs the page's inlined scripts in node (no DOM) and renders its spec headless to SVG."""
    html = show(plots_repo)
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.DOTALL)
    libs = [s for s in scripts if s.strip() and "vegaEmbed(" not in s]
    specs = [m.group(1) for s in scripts if (m := re.search(r"var spec = (.*?);\s*vegaEmbed\(", s, re.DOTALL))]
    assert len(libs) == 3 and len(specs) == 1
    js = """
    const vm = require('vm');
    const {libs, specs} = JSON.parse(require('fs').readFileSync(0, 'utf8'));
    const ctx = vm.createContext({console, setTimeout, clearTimeout, specs});
    libs.forEach((code, i) => new vm.Script(code, {filename: 'inline' + i}).runInContext(ctx));
    console.log(JSON.stringify([ctx.vega.version, ctx.vegaLite.version, ctx.vegaEmbed.version]));
    vm.runInContext(`Promise.all(specs.map(s => new vega.View(
        vega.parse(vegaLite.compile(JSON.parse(s)).spec), {renderer: 'none'}).toSVG()))`, ctx)
      .then(svgs => console.log(JSON.stringify(svgs)));
    """
    proc = subprocess.run(
        ["node", "-e", js], input=json.dumps({"libs": libs, "specs": specs}), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions, svgs = (json.loads(line) for line in proc.stdout.splitlines())
    assert versions == list(VENDORED.values())
    assert svgs[0].startswith("<svg") and svgs[0].count("<path") > 5
