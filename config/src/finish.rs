//! `switchyard rollout finish`: the policy text that makes a rollout's result permanent,
//! edited in place so that comments, order and every other line stay as written. A
//! complete rollout's candidate replaces the baseline in the default plan; either way the
//! `rollout:` section goes.

use crate::policy::{PlanConfig, PolicyFile};

/// How a rollout ended, for [`finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The candidate took every step: it becomes the default plan's choice.
    Promoted,
    /// The candidate was rolled back: the baseline stays.
    RolledBack,
}

/// The policy text with the rollout's result made permanent, and a line per change.
pub fn finish(
    text: &str,
    policy: &PolicyFile,
    ending: Ending,
) -> Result<(String, Vec<String>), String> {
    let Some(rollout) = &policy.rollout else {
        return Err(format!(
            "route '{}' has no rollout section",
            policy.route.value
        ));
    };
    let (candidate, baseline) = (
        &rollout.value.candidate.value,
        &rollout.value.baseline.value,
    );
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut changes = Vec::new();
    if ending == Ending::Promoted {
        let default = &policy.default;
        match &default.value {
            PlanConfig::Target(name) if name == baseline => {
                replace_at(
                    &mut lines,
                    default.line,
                    default.column,
                    baseline,
                    candidate,
                )?;
                changes.push(format!("default: {baseline} -> {candidate}"));
            }
            PlanConfig::Split(split) if split.weights.contains_key(baseline) => {
                if split.weights.contains_key(candidate) {
                    return Err(format!(
                        "the default split has both '{baseline}' and '{candidate}': move {baseline}'s weight to {candidate} by hand, then remove the rollout section"
                    ));
                }
                let w = &split.weights[baseline];
                replace_key_before(&mut lines, w.line, w.column, baseline, candidate)?;
                changes.push(format!("default split: {baseline} -> {candidate}"));
            }
            _ => {
                return Err(format!(
                    "the default plan does not name '{baseline}' directly or as a split member: point it at '{candidate}' by hand, then remove the rollout section"
                ));
            }
        }
    }
    remove_section(&mut lines, "rollout")?;
    changes.push("rollout section removed".into());
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    Ok((out, changes))
}

/// The 1-based `line` of the file, to edit.
fn line_mut(lines: &mut [String], line: u64) -> Result<&mut String, String> {
    lines
        .get_mut((line as usize).wrapping_sub(1))
        .ok_or_else(|| format!("line {line} is not in the file"))
}

/// Replaces `from` with `to` at 1-based `line`, `column`, checking the text is there.
fn replace_at(
    lines: &mut [String],
    line: u64,
    column: u64,
    from: &str,
    to: &str,
) -> Result<(), String> {
    let l = line_mut(lines, line)?;
    let start = (column as usize).saturating_sub(1);
    // A quoted scalar's position is its quote.
    let start = match l.as_bytes().get(start) {
        Some(b'"' | b'\'') => start + 1,
        _ => start,
    };
    if l.get(start..start + from.len()) != Some(from) {
        return Err(format!(
            "line {line} does not have '{from}' at column {column}: {l}"
        ));
    }
    l.replace_range(start..start + from.len(), to);
    Ok(())
}

/// Renames the map key `from` whose value starts at `line`, `column` (`from: value`).
fn replace_key_before(
    lines: &mut [String],
    line: u64,
    column: u64,
    from: &str,
    to: &str,
) -> Result<(), String> {
    let l = line_mut(lines, line)?;
    // Columns count characters: a byte index inside one falls back to the whole line.
    let end = (column as usize).saturating_sub(1).min(l.len());
    let before = l.get(..end).unwrap_or(l.as_str());
    let Some(at) = before.rfind(from) else {
        return Err(format!("line {line} has no key '{from}': {l}"));
    };
    l.replace_range(at..at + from.len(), to);
    Ok(())
}

/// Removes the top-level `key:` and every line of its block (indented, blank or comment
/// lines up to the next top-level line).
fn remove_section(lines: &mut Vec<String>, key: &str) -> Result<(), String> {
    let head = format!("{key}:");
    let Some(start) = lines.iter().position(|l| l.starts_with(&head)) else {
        return Err(format!("no top-level '{key}:' line"));
    };
    let mut end = start + 1;
    let mut last = start;
    while end < lines.len() {
        let l = &lines[end];
        let top = !l.is_empty() && !l.starts_with([' ', '\t']);
        if top {
            break;
        }
        if !l.trim().is_empty() {
            last = end;
        }
        end += 1;
    }
    lines.drain(start..=last);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
version: 1
route: r
targets:
  stable: { backend: stable, model: m, version: 1 }
  cand: { backend: canary, model: m, version: 2 }
# Everyone gets stable.
default: stable
shadow: { target: cand }
rollout:
  candidate: cand
  baseline: stable
  # the ramp
  steps: [10, 100]

  interval: 30s
fallback: [stable]
";

    fn parse(text: &str) -> PolicyFile {
        crate::parse_yaml(std::path::Path::new("r.yaml"), text).unwrap()
    }

    #[test]
    fn a_promoted_rollout_points_the_default_at_the_candidate_and_nothing_else_moves() {
        let (text, changes) = finish(POLICY, &parse(POLICY), Ending::Promoted).unwrap();
        assert_eq!(
            text,
            "version: 1\nroute: r\ntargets:\n  stable: { backend: stable, model: m, version: 1 }\n  cand: { backend: canary, model: m, version: 2 }\n# Everyone gets stable.\ndefault: cand\nshadow: { target: cand }\nfallback: [stable]\n"
        );
        assert_eq!(
            changes,
            ["default: stable -> cand", "rollout section removed"]
        );
        let p = parse(&text);
        assert!(p.rollout.is_none());
    }

    #[test]
    fn a_rolled_back_rollout_only_loses_its_section() {
        let (text, _) = finish(POLICY, &parse(POLICY), Ending::RolledBack).unwrap();
        assert!(
            text.contains("default: stable\n") && !text.contains("rollout"),
            "{text}"
        );
        assert!(text.ends_with("fallback: [stable]\n"));
    }

    #[test]
    fn a_split_member_is_renamed_and_a_split_holding_both_is_refused() {
        let split = POLICY
            .replace(
                "default: stable",
                "default:\n  split: { sticky: header:x-user, weights: { stable: 90, other: 10 } }",
            )
            .replace(
                "  cand: {",
                "  other: { backend: stable, model: m, version: 3 }\n  cand: {",
            );
        let (text, _) = finish(&split, &parse(&split), Ending::Promoted).unwrap();
        assert!(text.contains("weights: { cand: 90, other: 10 }"), "{text}");
        let both = split.replace("other: 10", "cand: 10");
        let e = finish(&both, &parse(&both), Ending::Promoted).unwrap_err();
        assert!(e.contains("by hand"), "{e}");
    }
}
