"""Fetch stages: ``torrent`` (the only importer of libtorrent) and ``hub`` (the only importer of
huggingface_hub). Both download into a staging folder and move files into place only after
``verify`` passes.
"""
