"""medgen: the MedicalGeneralist engine, an in-context medical image-to-image model.

Runs anywhere Python runs (no Slicer, no Qt): core (volumes, intensities, errors, config) · nn
(the model) · infer (volume inference for each task) · prompts (example pairs) · io (images,
weights) · metrics · cli. See ARCHITECTURE.md.
"""

__version__ = "0.2.0"
