"""Write infra/plots/offline.html: the page template of `dvc plots show` with Vega inlined, so it renders offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN and renders blank without network.
This script fetches the same versions DVC's renderer asks for from the npm registry (`npm pack`), inlines
their minified builds into a template that keeps DVC's `{plot_divs}` placeholder and drops `{scripts}`
(the CDN tags), and writes it where `.dvc/config` (`plots.html_template`) points. Without npm, or when the
registry cannot be reached, it writes DVC's own online template instead and says so: `dvc plots show`
keeps working, online only. Run by `make install`; rerun by hand with `python infra/plots/build_offline_template.py`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "offline.html"
PACKAGES = {  # npm package@version -> file inside its tarball; the versions dvc-render's page loads
    "vega@5.20.2": "package/build/vega.min.js",
    "vega-lite@5.2.0": "package/build/vega-lite.min.js",
    "vega-embed@6.18.2": "package/build/vega-embed.min.js",
}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch_scripts(workdir: Path) -> list[str]:
    """The minified builds of PACKAGES, in load order, fetched with `npm pack`."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found")
    subprocess.run([npm, "pack", "--silent", *PACKAGES], cwd=workdir, check=True, capture_output=True, timeout=300)
    scripts = []
    for spec, member in PACKAGES.items():
        name, version = spec.rsplit("@", 1)
        with tarfile.open(workdir / f"{name}-{version}.tgz") as tar:
            scripts.append(tar.extractfile(member).read().decode("utf-8"))
    return scripts


def main() -> int:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scripts = fetch_scripts(Path(tmp))
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, tarfile.TarError) as exc:
        from dvc_render.html import PAGE_HTML

        TARGET.write_text(PAGE_HTML, encoding="utf-8")
        print(f"warning: could not fetch Vega from npm ({exc}); {TARGET} loads it from the CDN, so `dvc plots show` "
              "needs network", file=sys.stderr)
        return 0
    # A script's text must not close its tag early; the builds hold no "</script", checked here.
    if any("</script" in s.lower() for s in scripts):
        raise SystemExit("a Vega build contains '</script'; cannot inline it")
    inline = "\n".join(f"    <script>{s}</script>" for s in scripts)
    TARGET.write_text(PAGE.replace("%s", inline, 1), encoding="utf-8")
    print(f"{TARGET}: dvc plots page with Vega inlined ({TARGET.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
