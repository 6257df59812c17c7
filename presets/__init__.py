"""presets: hardware probe, model footprint, the decision tree and the planner.

Arrives with the issue "Presets". Imports pipelines/ and vram/; never imported by them.
"""
