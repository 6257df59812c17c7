"""pipelines: model families, downloads, loading onto the core, generation phase by phase.

Arrives with the issue "Pipelines on the core". Imports vram/; never imported by it.
"""
