//! `--stacks` in the kernel: gives it the unwinding rules the stacks thread learned from the
//! samples, reads the stacks it then unwinds and counts itself (`KSTACKS`), and frees both when
//! their process exits (docs/design.md, "Stacks").

use std::collections::{HashMap, HashSet};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use membarrier_trace_common::{KSTACK_FRAMES, KStack, KStackKey, UnwindSlot, proc_id, unwind_slot};

use crate::{
    enrich::stacks::{Learned, MAX_STACKS},
    model::{ProcKey, StackCount, Stacks},
};

pub struct KernelStacks {
    rules: Array<MapData, UnwindSlot>,
    rows: BpfHashMap<MapData, KStackKey, KStack>,
    /// Each slot in use: for which process and pc (cleared at the process's exit).
    slots: HashMap<u32, (ProcKey, u64)>,
    /// Rules not given: their slot held another live process's or address's rule (or the
    /// write failed). Stacks through that code keep going to userspace as samples.
    pub rules_dropped: u64,
    /// `MEMBARRIER_TRACE_DEBUG_RULES`: say which rules met, or the write's error (the tests'
    /// way to see why one was dropped: one stacks test saw a rule dropped twice in about 25
    /// full runs, with 13 rules in 65,536 slots).
    debug: bool,
}

impl KernelStacks {
    /// Over the kernel's `UNWIND` and `KSTACKS` maps.
    pub fn new(
        rules: Array<MapData, UnwindSlot>,
        rows: BpfHashMap<MapData, KStackKey, KStack>,
    ) -> Self {
        Self {
            rules,
            rows,
            slots: HashMap::new(),
            rules_dropped: 0,
            debug: std::env::var_os("MEMBARRIER_TRACE_DEBUG_RULES").is_some(),
        }
    }

    /// Gives the kernel the rules learned for processes still alive.
    pub fn teach(&mut self, learned: Learned, live: &HashSet<ProcKey>) {
        for (p, pc, rule) in learned {
            if !live.contains(&p) {
                continue;
            }
            let proc = proc_id(p.0, p.1);
            let at = unwind_slot(pc, proc);
            if let Some(held) = self.slots.get(&at).filter(|held| **held != (p, pc)) {
                if self.debug {
                    eprintln!(
                        "membarrier-trace: unwinding rule of {p:?} at {pc:#x} not given: slot {at} \
                         holds {:?} at {:#x} ({} rules)",
                        held.0,
                        held.1,
                        self.slots.len()
                    );
                }
                self.rules_dropped += 1;
                continue;
            }
            match self.rules.set(at, UnwindSlot::new(pc, proc, rule), 0) {
                Ok(()) => {
                    self.slots.insert(at, (p, pc));
                }
                Err(e) => {
                    if self.debug {
                        eprintln!("membarrier-trace: unwinding rule of {p:?} at {pc:#x}: {e}");
                    }
                    self.rules_dropped += 1;
                }
            }
        }
    }

    /// Moves the stacks the kernel counted for the `dead` into `stacks` (each under its own
    /// process: the retire pass then sums them like the samples' stacks) and frees their rules.
    pub fn retire(&mut self, dead: &HashSet<ProcKey>, stacks: &mut Stacks) -> Result<()> {
        let rules = &mut self.rules;
        self.slots.retain(|&at, (p, _)| {
            let live = !dead.contains(p);
            if !live {
                let _ = rules.set(at, UnwindSlot::default(), 0);
            }
            live
        });
        let keys: Vec<KStackKey> = self
            .rows
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the kernel's stacks")?;
        for k in keys.iter().filter(|k| dead.contains(&(k.tgid, k.serial))) {
            let row = self.rows.get(k, 0).context("reading a kernel stack")?;
            self.rows.remove(k).context("freeing a kernel stack")?;
            add(stacks, k, &row);
        }
        Ok(())
    }

    /// `stacks` with the stacks the kernel counted for live processes added.
    pub fn with_live(&self, mut stacks: Stacks) -> Result<Stacks> {
        for item in self.rows.iter() {
            let (k, row) = item.context("reading the kernel's stacks")?;
            // Made, its first call not yet added.
            if row.exact + row.sampled > 0 {
                add(&mut stacks, &k, &row);
            }
        }
        Ok(stacks)
    }
}

fn add(stacks: &mut Stacks, k: &KStackKey, row: &KStack) {
    let depth = (row.depth as usize).min(KSTACK_FRAMES);
    let c = StackCount {
        exact: row.exact,
        exact_ns: row.exact_ns,
        sampled: row.sampled,
        sampled_ns: row.sampled_ns,
        complete: row.complete != 0,
        kernel: row.exact + row.sampled,
    };
    let g = ((k.tgid, k.serial), k.cmd, k.flags);
    stacks.add(g, row.pcs[..depth].to_vec(), &c, MAX_STACKS);
}

#[cfg(test)]
mod tests {
    use membarrier_trace_common::{UNWIND_SLOTS, UnwindSlot, unwind_slot};

    /// A slot holds its own (pc, process) only; a zeroed one nothing; one read half old, half
    /// new (userspace rewriting it as the kernel reads) nothing either.
    #[test]
    fn slots_hold_their_own_rule_only() {
        let (old, new) = (UnwindSlot::new(0x1000, 7, 3), UnwindSlot::new(0x2000, 9, 5));
        assert!(old.holds(0x1000, 7));
        assert!(!old.holds(0x1000, 9));
        assert!(!UnwindSlot::default().holds(0, 0));
        let torn = [
            UnwindSlot { pc: new.pc, ..old },
            UnwindSlot {
                rule: new.rule,
                ..old
            },
            UnwindSlot {
                check: new.check,
                ..old
            },
            UnwindSlot {
                pc: new.pc,
                proc: new.proc,
                ..old
            },
        ];
        for t in torn {
            assert!(!t.holds(t.pc, t.proc), "{t:?}");
        }
        assert!(unwind_slot(u64::MAX, u64::MAX) < UNWIND_SLOTS);
    }
}
