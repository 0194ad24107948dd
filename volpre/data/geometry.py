"""The one fact about patient coordinates that readers and writers share.

DICOM and ITK (NRRD, MetaImage) give positions in LPS millimetres (x to the patient's left,
y to the back, z to the head); volpre, NIfTI and MONAI in RAS (x right, y front, z head).
The two differ by the sign of x and y, so one matrix converts both ways.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``(4, 4)``: ``LPS_TO_RAS @ lps_affine`` is the RAS affine; the matrix is its own inverse, so
``LPS_TO_RAS @ ras_affine`` is the LPS one."""
LPS_TO_RAS.setflags(write=False)
