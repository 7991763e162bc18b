"""The Slicer module's own code (MRML in and out, runs started from the GUI); no Qt.

The engine it drives is the `medgen` package beside it.
"""
