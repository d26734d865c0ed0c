"""Numerics shared by every layer (log-space densities of constrained sites; whether a log density
calls LAPACK, ``lapack``; ``jax.random``'s draws without its CPU loop, ``random``; a value
computed as a kernel of its own, ``fusion``). Imports nothing from ngvi but ``ngvi.errors``."""

from ngvi.numerics.logspace import logspace_site, stable_potential_energy, stick_breaking_log

__all__ = ["logspace_site", "stable_potential_energy", "stick_breaking_log"]
