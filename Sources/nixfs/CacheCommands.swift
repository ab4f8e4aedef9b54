import ArgumentParser

/// Subcommands of the cache client layer.
let cacheCommands: [any ParsableCommand.Type] = []
