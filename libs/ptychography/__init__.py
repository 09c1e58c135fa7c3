"""Ptychography facts shared by the simulator, the workers and the scoring: optics and quality.

Worker-specific science lives next to its worker (services/*_worker/); what several of them need
to agree on (how a pixel maps to metres on the sample, what a zone-plate probe looks like, how a
result is scored) lives here once.
"""
