"""MedicalGeneralist engine: an in-context medical image-to-image model, with no Slicer or Qt.

OpenMP's default busy-waiting makes torch 10-20x slower on a CPU shared with anything else (a
Slicer GUI, a second job); passive waiting costs nothing measurable when the CPU is free. It only
takes effect if set before torch is first imported, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
