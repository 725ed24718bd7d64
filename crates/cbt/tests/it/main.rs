//! The `cbt` crate's integration tests: the planner's table and property tests against the
//! naive models of `cbt::oracle`.

mod planner;
mod props;
