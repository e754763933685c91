"""Shared primitives below the tasks: prediction options and writers, drawing and plots."""
