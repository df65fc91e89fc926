"""What each command does, called by the CLI: the train/merge/eval/export stages (`stages`), `validate`,
`cluster-heads` (`cluster`), MoLE's per-domain experts, `chat`/`generate`, `runs`, `data inspect`."""
