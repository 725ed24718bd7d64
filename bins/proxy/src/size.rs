//! Byte sizes on the command line: `4M`, `256MiB`, `1G`, `65536` (binary multiples), parsed
//! as the configuration file parses them.

pub(crate) use orchestration::config::parse_size as parse;
