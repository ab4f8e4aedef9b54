// The git commit of this build comes from BuildInfoPlugin, which generates `buildCommit` beside
// this file before every build (Package.swift).
