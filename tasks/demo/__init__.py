"""Synthetic demo region (imagery, multi-labeller polygons, hidden truth) for tests, demos and benchmarks."""

from tasks.demo.generate import DemoSummary, generate_demo_region

__all__ = ["DemoSummary", "generate_demo_region"]
