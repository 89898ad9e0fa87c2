"""Integration with mergekit: registration of the methods and the command-line tools."""
