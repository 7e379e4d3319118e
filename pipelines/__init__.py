"""How data and models move on Ray: storage, readers, preprocessing actors, the training loop,
batch inference and the Serve app. Task-agnostic: it only calls a `models.spec.TaskSpec`."""
