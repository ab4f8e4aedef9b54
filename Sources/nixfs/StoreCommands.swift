import ArgumentParser

/// Subcommands of the chunk store layer.
let storeCommands: [any ParsableCommand.Type] = []
