//! Durations on the command line: one syntax for every time flag (`500ms`, `30s`, `5m`, `1h`;
//! a bare `0` is none), parsed as the configuration file parses them.

pub(crate) use orchestration::config::{parse_duration as parse, parse_millis as millis};
