"""Procedural dashcam frames: normal highway driving and eleven labelled edge-case families.

No driving data set can be downloaded here, so edgecase makes its own. Normal frames are the bulk
of a fleet's data (daytime, clear sky, highway, straight road) with wide natural variation; the
edge cases come in families, each with a ``strength`` in [0, 1]. Every normal parameter is drawn
per frame (in the spirit of domain randomisation, Tobin et al., IROS 2017) so that "normal" is a
broad distribution rather than one picture a model could memorise. Rendering is numpy only,
vectorised over a batch, and deterministic: a frame depends only on (seed, split, family, index).
Frames are any H x W: wide ones (256x144 by default, up to 4K) through a metric pinhole camera
(``pinhole.py``), square ones exactly as they were before frames had an aspect ratio.

Public API: ``FAMILIES``, ``render_batch``, ``write_dataset``, ``write_contact_sheet``.
"""

from training.synth.api import render_batch
from training.synth.contact_sheet import write_contact_sheet
from training.synth.dataset import SPLITS, write_dataset
from training.synth.families import FAMILIES, NORMAL

__all__ = ["FAMILIES", "NORMAL", "SPLITS", "render_batch", "write_contact_sheet", "write_dataset"]
