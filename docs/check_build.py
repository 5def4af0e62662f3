"""Checks of the built site that Sphinx's own warnings do not cover (run by .ci/run after the build).

- every public name of the documented packages is in the site's inventory (it has an API entry);
- every tutorial page shows figures, and every image a page refers to was written;
- the home page shows the compare figure;
- where Chromium is installed (Debian's ``chromium``), the home page and a tutorial page are
  rendered headless to ``screenshots/`` beside the site, to look at.

    python docs/check_build.py docs/_build/html
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sphinx.util.inventory import InventoryFile

PACKAGES = (
    "captum_normgrad",
    "captum_normgrad.losses",
    "captum_normgrad.metrics",
    "captum_normgrad.evaluation",
    "captum_normgrad.training",
    "captum_normgrad.detection",
)


def problems(site: Path) -> list[str]:
    found = []
    with open(site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: uri)
    documented = {name for kind in inventory.values() for name in kind}
    for package in PACKAGES:
        for name in importlib.import_module(package).__all__:
            if f"{package}.{name}" not in documented:
                found.append(f"{package}.{name} has no entry in the API reference")
    pages = sorted((site / "tutorials").glob("*.html"))
    if len(pages) != 6:
        found.append(f"expected 6 tutorial pages, found {len(pages)}")
    for page in [*pages, site / "index.html"]:
        html = page.read_text()
        images = re.findall(r'<img[^>]+src="([^"]+)"', html)
        if not images:
            found.append(f"{page.relative_to(site)} shows no figure")
        for source in images:
            if (
                not source.startswith(("http:", "https:", "data:"))
                and not (page.parent / source).is_file()
            ):
                found.append(f"{page.relative_to(site)} refers to a missing image {source}")
    return found


def screenshots(site: Path) -> list[str]:
    """Headless Chromium renders two pages; an empty or missing picture is a problem."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return []
    folder = site.parent / "screenshots"
    folder.mkdir(exist_ok=True)
    found = []
    for page in ("index.html", "tutorials/01_normgrad_vs_gradcam.html"):
        picture = folder / (page.replace("/", "_").removesuffix(".html") + ".png")
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += [
            "--window-size=1280,1600",
            f"--screenshot={picture}",
            (site / page).resolve().as_uri(),
        ]
        subprocess.run(command, capture_output=True, timeout=120, check=False)
        if not picture.is_file() or picture.stat().st_size < 10_000:
            found.append(f"headless Chromium drew no picture of {page}")
    return found


if __name__ == "__main__":
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")
    listed = problems(site) + screenshots(site)
    print("\n".join(listed) or "the built site has every public name and every figure")
    sys.exit(1 if listed else 0)
