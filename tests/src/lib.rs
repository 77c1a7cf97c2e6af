//! stub
pub mod demo {
    pub fn run(_: &std::path::Path, _: u32) -> anyhow::Result<()> {
        Ok(())
    }
}
