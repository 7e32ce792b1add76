"""How much of the latent each section uses: the active GP and Gaussian dimensions of trained models.

Usage: python benchmarks/latent_dims.py LATENTS_DIR [--n-gp 2]

``LATENTS_DIR`` holds the ``<case>_seed<seed>.npz`` files of ``benchmarks/panel.py --latents``. For each file: the
variance across spots of every latent column's posterior mean and which are active
(:func:`spavae.analysis.active_dimensions`: variance above 0.01, Burda et al. 2016). One JSON line per file, then one
summary line per case (the active GP and Gaussian counts of its seeds).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from spavae.analysis.latent_activity import active_dimensions, count_active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latents", type=Path)
    parser.add_argument("--n-gp", type=int, default=2, help="GP dimensions, the first columns (default 2)")
    args = parser.parse_args()
    counts = defaultdict(list)
    for path in sorted(args.latents.glob("*_seed*.npz")):
        case, seed = re.fullmatch(r"(.+)_seed(\d+)", path.stem).groups()
        latent = np.load(path, allow_pickle=False)["latent"].astype(np.float64)
        gp, gaussian = count_active(active_dimensions(latent), args.n_gp).values()
        counts[case].append((gp, gaussian))
        print(json.dumps({"case": case, "seed": int(seed), "n_spots": len(latent), "active_gp": gp,
                          "active_gaussian": gaussian,
                          "variance": [round(float(v), 4) for v in latent.var(axis=0)]}), flush=True)
    for case, pairs in counts.items():
        print(json.dumps({"summary": True, "case": case, "active_gp": [gp for gp, _ in pairs],
                          "active_gaussian": [gaussian for _, gaussian in pairs]}), flush=True)


if __name__ == "__main__":
    main()
