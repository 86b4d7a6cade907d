"""`autoglm-tune bench`: what tuning buys on this machine, measured with a real llama.cpp server.

Functional core (no I/O): `design` (scenarios, configurations, options, the interleaved schedule), `report`
(per-run statistics, the summary, the markdown table) and `stats` (paired ratios, intervals). Imperative shell:
`machine` (settings, counters and the `Guard` that restores them), `runner` (one run, the whole bench, the
outputs), `worker` (the desktop, the CPU hog, the model writer and the plot, run by another interpreter) and
`cli` (the command's options). Nothing is imported here: `autoglm-tune` registers `cli` on every start.

Low-spec emulation (research kernel-and-platform.md §9): RAM is taken away from the whole kernel by a
hugetlb reservation (`vm.nr_hugepages`), so zswap's pool, the page cache and every process compete for
the same RAM as on a small box. On a cgroup v1 host each run's processes go into a fresh memory cgroup
(no limit) made after the configuration is set: v1 copies `vm.swappiness` into a cgroup when it is made.
"""
