//! `transcode members`: the gossip membership as the database last recorded it (the scaler
//! writes `members` rows every few seconds and at once on a state change).

use crate::output;
use anyhow::Result;
use std::sync::Arc;
use transcode_core::membership::MemberTags;
use transcode_core::store::Store;

pub async fn run(store: Arc<dyn Store>, json: bool) -> Result<()> {
    let members = store.members().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            // Tags written by an older or newer version may not parse; show what is there.
            let tags: MemberTags = serde_json::from_value(m.tags.clone()).unwrap_or_default();
            let ago = (now - m.last_seen).num_milliseconds().max(0) as f64 / 1000.0;
            vec![
                m.id.clone(),
                m.role.clone(),
                m.node.clone(),
                m.state.clone(),
                format!("{ago:.1}s ago"),
                format!("{:.1}%", tags.cpu),
                format!("{:.1}%", tags.mem),
                format!("{}/{}", tags.busy, tags.slots),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "ID",
                "ROLE",
                "NODE",
                "STATE",
                "LAST SEEN",
                "CPU",
                "MEM",
                "BUSY"
            ],
            &rows
        )
    );
    Ok(())
}
