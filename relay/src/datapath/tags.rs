//! Counting a frame's fate by the tag it travels with, whatever plan the counting worker has
//! taken up by then.
//!
//! A frame's tag names its rule and output by their indices in the plan its receiving worker
//! had. The frame is counted as received there and then, but as sent (or dropped) later, by the
//! worker that owns its egress, which may have taken up another plan in between: a reload or an
//! interface deleted or created again publishes one, and workers take it up one after the other.
//! A count for a tag of an older plan goes to the output the counters were carried to (as
//! [`remap`](super::worker::remap) carries them); one for a tag of a newer plan waits until the
//! worker takes that plan up. Dropping either would leave an output's `sent` plus its drops
//! short of its rule's `received` for good.

use std::{collections::VecDeque, sync::Arc};

use super::{
    stats::{DatapathStats, OutputCounters},
    worker::{Plan, Tag},
};

/// Plans a worker remembers behind its current one. Workers take up every plan (a reload waits
/// until each has), so a tag is at most one plan behind unless its frame waited in a lane or for
/// TX room across several reloads in a row.
const REMEMBERED: usize = 8;

/// The plans behind a worker's current one, and counts for plans ahead of it.
#[derive(Default)]
pub(super) struct TagBooks {
    /// Oldest first.
    older: VecDeque<Arc<Plan>>,
    /// Counts for tags of a plan newer than the worker's: another worker took it up first and
    /// handed the frame over.
    ahead: Vec<(Tag, OutputCounters)>,
}

impl TagBooks {
    /// The counters in `stats` (shaped by `plan`) that a count for `tag` belongs in: the
    /// output's own, the ones its counters were carried to if the tag is of an older plan
    /// (`None` if they were not carried: the output is gone, and its counters with it), or a
    /// place to hold the count until the worker takes up the tag's newer plan.
    pub fn counters<'a>(
        &'a mut self,
        stats: &'a mut DatapathStats,
        plan: &Plan,
        tag: Tag,
    ) -> Option<&'a mut OutputCounters> {
        let now = plan.generation as u16;
        if tag.plan == now {
            return at(stats, tag);
        }
        if (tag.plan.wrapping_sub(now) as i16) > 0 {
            let i = match self.ahead.iter().position(|(t, _)| *t == tag) {
                Some(i) => i,
                None => {
                    self.ahead.push((tag, OutputCounters::default()));
                    self.ahead.len() - 1
                }
            };
            return Some(&mut self.ahead[i].1);
        }
        let from = self
            .older
            .iter()
            .position(|p| p.generation as u16 == tag.plan)?;
        let mut t = tag;
        for (old, new) in self
            .older
            .range(from..)
            .zip(self.older.range(from + 1..).map(|p| &**p).chain([plan]))
        {
            t = carry(old, new, t)?;
        }
        at(stats, t)
    }

    /// The worker moved from plan `old` to `new`, and `stats` was re-shaped to `new`: counts
    /// held for `new` join them.
    pub fn adopted(&mut self, old: Arc<Plan>, new: &Plan, stats: &mut DatapathStats) {
        if self.older.len() == REMEMBERED {
            self.older.pop_front();
        }
        self.older.push_back(old);
        for (tag, counts) in std::mem::take(&mut self.ahead) {
            if let Some(c) = self.counters(stats, new, tag) {
                c.add(&counts);
            }
        }
    }
}

fn at(stats: &mut DatapathStats, tag: Tag) -> Option<&mut OutputCounters> {
    stats
        .rules
        .get_mut(tag.rule as usize)?
        .outputs
        .get_mut(tag.output as usize)
}

/// Where `new` keeps the counters of `tag`'s output of `old`, if it does.
fn carry(old: &Plan, new: &Plan, tag: Tag) -> Option<Tag> {
    let name = &old.table.rules.get(tag.rule as usize)?.name;
    let rule = new.table.rules.iter().position(|r| r.name == *name)?;
    carries_output(old, tag.rule as usize, new, rule, usize::from(tag.output)).then_some(Tag {
        rule: rule as u32,
        output: tag.output,
        plan: new.generation as u16,
    })
}

/// Whether output `k` of rule `or` of `old` and of rule `nr` of `new` are the same output, so
/// its counters carry over: the same interface (by name: counters belong to the rule's output,
/// not to a device, which may be created again) with the same rewrite at the same position.
pub(super) fn carries_output(old: &Plan, or: usize, new: &Plan, nr: usize, k: usize) -> bool {
    let (Some(oo), Some(no)) = (
        old.table.rules[or].outputs.get(k),
        new.table.rules[nr].outputs.get(k),
    ) else {
        return false;
    };
    old.table.egress[oo.egress].name == new.table.egress[no.egress].name
        && oo.action.same_output(&no.action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Config, StaticSystem},
        rules::RuleTable,
    };

    fn plan(generation: u64, yaml: &str) -> Arc<Plan> {
        let system = StaticSystem::new(&[("in0", 10), ("out0", 11), ("out1", 12), ("out2", 13)]);
        let cfg = Config::parse("rules.yaml", yaml).unwrap();
        let table = RuleTable::compile(&cfg, "rules.yaml", &system).unwrap();
        Arc::new(Plan {
            generation,
            egress_port: vec![None; table.egress.len()],
            egress_owner: vec![None; table.egress.len()],
            egress_domain: vec![super::super::NO_DOMAIN; table.egress.len()],
            ingress_ports: Vec::new(),
            retire: Vec::new(),
            fill_targets: Vec::new(),
            table,
        })
    }

    const AB: &str = "rules:
  - { name: a, input: { interface: in0, group: 239.1.1.1, port: 5000 }, outputs: [{ interface: out0 }, { interface: out1 }] }
  - { name: b, input: { interface: in0, group: 239.2.2.2, port: 5000 }, outputs: [{ interface: out2 }] }
";
    /// `AB` with the rules swapped, and rule a's second output sent elsewhere.
    const BA: &str = "rules:
  - { name: b, input: { interface: in0, group: 239.2.2.2, port: 5000 }, outputs: [{ interface: out2 }] }
  - { name: a, input: { interface: in0, group: 239.1.1.1, port: 5000 }, outputs: [{ interface: out0 }, { interface: out2 }] }
";

    fn tag(plan: u16, rule: u32, output: u16) -> Tag {
        Tag { rule, output, plan }
    }

    fn shaped(p: &Plan) -> DatapathStats {
        DatapathStats::new(p.table.rules.iter().map(|r| r.outputs.len()))
    }

    fn count(books: &mut TagBooks, stats: &mut DatapathStats, p: &Plan, t: Tag) -> bool {
        books
            .counters(stats, p, t)
            .map(|c| c.packets += 1)
            .is_some()
    }

    #[test]
    fn a_tag_of_the_current_plan_counts_where_it_points() {
        let p = plan(1, AB);
        let (mut books, mut stats) = (TagBooks::default(), shaped(&p));
        assert!(count(&mut books, &mut stats, &p, tag(1, 0, 1)));
        assert_eq!(stats.rules[0].outputs[1].packets, 1);
        assert!(
            !count(&mut books, &mut stats, &p, tag(1, 5, 0)),
            "no such rule"
        );
    }

    #[test]
    fn tags_of_older_plans_follow_their_outputs_counters() {
        let (p1, p2, p3) = (plan(1, AB), plan(2, BA), plan(3, AB));
        let mut books = TagBooks::default();
        let mut stats = shaped(&p1);
        books.adopted(p1.clone(), &p2, &mut stats);
        stats = shaped(&p2);
        // Rule a moved from index 0 to 1; its first output is the same, its second is not.
        assert!(count(&mut books, &mut stats, &p2, tag(1, 0, 0)));
        assert_eq!(stats.rules[1].outputs[0].packets, 1);
        assert!(
            !count(&mut books, &mut stats, &p2, tag(1, 0, 1)),
            "not carried"
        );
        assert!(count(&mut books, &mut stats, &p2, tag(1, 1, 0)));
        assert_eq!(stats.rules[0].outputs[0].packets, 1);
        // Two plans behind: through both steps.
        books.adopted(p2.clone(), &p3, &mut stats);
        let mut stats = shaped(&p3);
        // Rule a (index 0 of plan 1) is back at index 0; rule b (index 0 of plan 2) at 1.
        assert!(count(&mut books, &mut stats, &p3, tag(1, 0, 0)));
        assert!(count(&mut books, &mut stats, &p3, tag(2, 0, 0)));
        assert!(count(&mut books, &mut stats, &p3, tag(2, 0, 0)));
        assert_eq!(stats.rules[0].outputs[0].packets, 1);
        assert_eq!(stats.rules[1].outputs[0].packets, 2);
        // A plan forgotten, or never seen.
        assert!(!count(&mut books, &mut stats, &p3, tag(0, 0, 0)));
    }

    #[test]
    fn tags_of_a_newer_plan_wait_for_it() {
        let (p1, p2) = (plan(7, AB), plan(8, BA));
        let mut books = TagBooks::default();
        let mut stats = shaped(&p1);
        for _ in 0..3 {
            assert!(count(&mut books, &mut stats, &p1, tag(8, 1, 1)));
        }
        assert!(count(&mut books, &mut stats, &p1, tag(8, 0, 0)));
        assert_eq!(stats, shaped(&p1), "nothing counted under the old shape");
        let mut stats = shaped(&p2);
        books.adopted(p1, &p2, &mut stats);
        assert_eq!(stats.rules[1].outputs[1].packets, 3);
        assert_eq!(stats.rules[0].outputs[0].packets, 1);
        assert!(books.ahead.is_empty());
    }

    #[test]
    fn generations_compare_across_the_wrap_of_the_tag() {
        let (p1, p2) = (plan(u64::from(u16::MAX), AB), plan(1 << 16, AB));
        let mut books = TagBooks::default();
        let mut stats = shaped(&p1);
        assert!(count(&mut books, &mut stats, &p1, tag(0, 0, 0)));
        assert_eq!(stats.rules[0].outputs[0].packets, 0, "0 is after 65535");
        let mut stats = shaped(&p2);
        books.adopted(p1, &p2, &mut stats);
        assert_eq!(stats.rules[0].outputs[0].packets, 1);
        assert!(count(&mut books, &mut stats, &p2, tag(u16::MAX, 0, 1)));
        assert_eq!(stats.rules[0].outputs[1].packets, 1);
    }
}
