"""Timing, statistics, machine ceilings, perf runs and the regression gate."""
