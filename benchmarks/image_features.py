"""Time and memory of the per-spot image features (spavae.image).

Usage: python benchmarks/image_features.py [--out FILE.jsonl] [--side 25000] [--repeats 3] [--skip-slide]

Cases, one JSON line each:

* ``dlpfc_<section>``: each shared DLPFC section (``../shared/data/dlpfc``: counts ``sample_<section>.h5`` with
  its ``spatial/<section>`` folder attached by barcode) through :func:`spavae.image.extract_image_features`
  on the 600 x 600 thumbnail (about 4 pixels per spot): seconds per call (``--repeats`` calls), the spots
  masked and why;
* ``slide_<layout>_level<k>``: a synthetic H&E-like whole-slide image of ``--side`` x ``--side`` RGB pixels,
  written tile by tile (512 x 512, uncompressed, pyramid levels 1/4 and 1/16 as SubIFDs) to a temporary
  BigTIFF, then 4,096 spots (a 64 x 64 hexagonal lattice, 55 px across) read from the file by path: in the
  ``capture_area`` layout the spots are 100 px apart in the middle of the slide (a Visium capture area at
  about 1 um per pixel), in ``spread`` they cover the whole slide (blocks all over it are read). Each measurement runs
  in a fresh Python process: seconds, the peak resident memory of the call (``VmHWM`` of
  ``/proc/self/status``, reset just before it) and its rise over the resident memory before it (imports,
  torch included), and the peak of traced allocations (tracemalloc, in a second, untimed call).

The slide file sits in the page cache after it is written, so the timings are of cached reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dlpfc"
TILE = 512
COARSE = 4  # the slide's colours are evaluated every 4 pixels (then pixel noise is added)
SPOT_DIAMETER = 55.0
SPOT_SPACING = 100.0
LATTICE = 64
BACKGROUND = np.array([242, 242, 245], np.float32)
TISSUE = np.array([224, 153, 189], np.float32)
LAYER = np.array([168, 117, 189], np.float32)


def dlpfc_case(section: str, repeats: int) -> dict:
    """Thumbnail features of one shared DLPFC section."""
    import spavae
    from spavae.image import add_spaceranger_image, extract_image_features

    adata = spavae.read_spavae_h5(SHARED / f"sample_{section}.h5")
    add_spaceranger_image(adata, SHARED / "spatial" / section)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            features = extract_image_features(adata, "lowres", spatial_key="spatial_fullres")
        seconds.append(time.perf_counter() - start)
    reasons = {r: int((features.reasons == r).sum()) for r in ("off_image", "background")
               if (features.reasons == r).any()}
    return {"case": f"dlpfc_{section}", "n_spots": features.n_spots, "n_features": features.n_features,
            "image": "lowres 600x600", "diameter_px": round(features.settings["diameter_px"], 3),
            "seconds": [round(s, 3) for s in seconds], "seconds_median": round(float(np.median(seconds)), 3),
            "n_masked": int((~features.mask).sum()), "fraction_masked": round(float((~features.mask).mean()), 4),
            "masked_reasons": reasons,
            "background_colour": [round(c, 3) for c in features.settings["background_colour"]]}


def slide_colour(x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """RGB (float, 0-255) of the synthetic slide at full-resolution coordinates: white glass, a pink tissue
    ellipse with wavy purple layers."""
    u, v = x / side - 0.5, y / side - 0.5
    tissue = (u / 0.42) ** 2 + (v / 0.36) ** 2 < 1.0 + 0.05 * np.sin(20 * np.arctan2(v, u))
    layer = np.sin(2 * np.pi * (v * 9 + 0.4 * np.sin(2 * np.pi * u * 3))) > 0.55
    colour = np.where(layer[..., None], LAYER, TISSUE)
    return np.where(tissue[..., None], colour, BACKGROUND)


def slide_tiles(side: int, step: int, noise: np.ndarray):
    """The tiles of the level whose pixels are ``step`` full-resolution pixels apart, row by row."""
    size = -(-side // step)
    rng = np.random.default_rng(step)
    for row in range(0, size, TILE):
        for col in range(0, size, TILE):
            y, x = np.mgrid[row:row + TILE:COARSE, col:col + TILE:COARSE] * float(step)
            colour = np.repeat(np.repeat(slide_colour(x, y, side), COARSE, axis=0), COARSE, axis=1)
            tile = colour + np.roll(noise, tuple(rng.integers(0, TILE, 2)), axis=(0, 1))
            yield np.clip(tile, 0, 255).astype(np.uint8)


def write_slide(path: Path, side: int) -> float:
    """Write the pyramidal tiled BigTIFF tile by tile; seconds taken."""
    import tifffile

    noise = np.random.default_rng(0).normal(0, 10, (TILE, TILE, 3)).astype(np.float32)
    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for level, step in enumerate((1, 4, 16)):
            size = -(-side // step)
            tiff.write(slide_tiles(side, step, noise), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE),
                       photometric="rgb", **({"subifds": 2} if level == 0 else {"subfiletype": 1}))
    return time.perf_counter() - start


def slide_spots(side: int, layout: str) -> np.ndarray:
    """Full-resolution (x, y) of the 64 x 64 hexagonal lattice of spots."""
    from spavae.data.simulate import hex_grid

    lattice = hex_grid(LATTICE, LATTICE)
    if layout == "capture_area":
        return side / 2 + (lattice - lattice.mean(0)) * SPOT_SPACING
    return side * 0.03 + lattice / lattice.max(0) * side * 0.94


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the peak resident set size (Linux: write 5 to /proc/self/clear_refs); the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status("VmRSS")


def measure_child(path: str, side: int, layout: str, level: int) -> dict:
    """Run in a fresh process: time and memory of the features of the slide's spots."""
    import tracemalloc

    import anndata as ad
    import pandas as pd

    from spavae.image import extract_image_features, tiff_image

    coordinates = slide_spots(side, layout)
    adata = ad.AnnData(np.zeros((len(coordinates), 1), np.float32),
                       obs=pd.DataFrame(index=[f"spot{i}" for i in range(len(coordinates))]))
    adata.obsm["spatial"] = coordinates
    baseline = reset_peak_rss()
    options = {"spot_diameter": SPOT_DIAMETER}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tiff_image(path, level=level) as source:
            features = extract_image_features(adata, source, **options)
    seconds = time.perf_counter() - start
    peak = proc_status("VmHWM")
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tiff_image(path, level=level) as source:
            extract_image_features(adata, source, **options)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"n_spots": features.n_spots, "diameter_px": round(features.settings["diameter_px"], 3),
            "seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2 ** 20, 1),
            "rss_before_mb": round(baseline / 2 ** 20, 1),
            "peak_rss_rise_mb": round((peak - baseline) / 2 ** 20, 1),
            "traced_peak_mb": round(traced / 2 ** 20, 1), "n_masked": int((~features.mask).sum())}


def slide_cases(side: int) -> list[dict]:
    """Write the slide, then measure each layout and level in its own process."""
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        path = Path(folder) / "slide.tif"
        write_seconds = write_slide(path, side)
        slide_gb = side * side * 3 / 1e9
        for layout, level in (("capture_area", 0), ("spread", 0), ("capture_area", 2)):
            output = subprocess.run([sys.executable, __file__, "--child", str(path), str(side), layout, str(level)],
                                    capture_output=True, text=True, check=True).stdout
            rows.append({"case": f"slide_{layout}_level{level}", "side_px": side, "tile": TILE,
                         "slide_gb_uncompressed": round(slide_gb, 3),
                         "file_gb": round(path.stat().st_size / 1e9, 3), "write_seconds": round(write_seconds, 1),
                         **json.loads(output.strip().splitlines()[-1])})
    return rows


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(measure_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file")
    parser.add_argument("--side", type=int, default=25_000, help="side of the synthetic slide in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="calls per DLPFC section")
    parser.add_argument("--skip-slide", action="store_true", help="only the DLPFC thumbnails")
    args = parser.parse_args()
    context = {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    rows = [dlpfc_case(section, args.repeats) for section in ("151507", "151510")
            if (SHARED / f"sample_{section}.h5").is_file()]
    if not args.skip_slide:
        rows += slide_cases(args.side)
    for row in rows:
        line = json.dumps({**row, **context})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
