"""medgen.nn."""
