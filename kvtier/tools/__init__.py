"""kvtier's command-line tooling: the `kvtier` command (demo, niah, bench, profile), their reports, the haystacks and
long-context fills they build, timing and memory measurement, and model loaders; benchmarks/ builds on it too. Needs
the `tools` extra (matplotlib, nvidia-ml-py for pynvml); the library (kvtier.ReAttentionCache) never imports this
package."""
