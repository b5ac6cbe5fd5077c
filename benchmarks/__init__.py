"""Benchmarks for eventbus: run with ``python -m benchmarks run [--quick]``.

Each benchmark measures eventbus beside a baseline taken in the same run (raw asyncpg or raw SQL doing the same
work by hand) and prints the ratio, so that figures from a noisy machine still compare like with like. They
print numbers; they never assert timings (see STYLE.md).
"""
