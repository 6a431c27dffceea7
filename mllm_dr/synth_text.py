"""Sentence templates for the synthetic corpus: what a participant says at each item score.

Deliberately simple and transparent: the text signal of a synthetic participant is
exactly the template of each item's score. Nothing here is clinical data.
"""

from __future__ import annotations

# item -> four lists (scores 0..3) of interchangeable participant answers
EN: dict[str, list[list[str]]] = {
    "NoInterest": [
        ["I still enjoy my hobbies a lot.", "I love going hiking on weekends."],
        ["Some days I don't feel like doing my hobbies.", "Now and then I skip things I usually enjoy."],
        ["Most days nothing really interests me anymore.", "I stopped going out with friends most of the time."],
        ["I don't enjoy anything at all, every single day.", "Nothing gives me any pleasure anymore, ever."],
    ],
    "Depressed": [
        ["My mood is good, I feel pretty happy.", "I'm in a good place emotionally."],
        ["I feel a bit down once in a while.", "Sometimes I get sad for a day or two."],
        ["I feel down and hopeless more days than not.", "Most of the week I feel really low."],
        ["I feel hopeless and depressed nearly every day.", "Every day feels dark and hopeless to me."],
    ],
    "Sleep": [
        ["I sleep well, about eight hours a night.", "Sleep is no problem for me."],
        ["A few nights I have trouble falling asleep.", "Occasionally I wake up too early."],
        ["More than half the nights I can't sleep properly.", "I often lie awake for hours."],
        ["I barely sleep at all, it happens every night.", "Every night I wake up at three and can't sleep again."],
    ],
    "Tired": [
        ["I have plenty of energy.", "I feel energetic most of the time."],
        ["Some days I feel a bit tired.", "Now and then I'm low on energy."],
        ["I'm exhausted most days of the week.", "Often I have no energy to get things done."],
        ["I'm completely drained every single day.", "I feel tired all the time, nearly every day."],
    ],
    "Appetite": [
        ["My appetite is normal.", "I eat regular meals without any problem."],
        ["Sometimes I skip a meal because I'm not hungry.", "Once in a while I overeat."],
        ["Most days I have no appetite.", "I've been overeating more days than not."],
        ["I can hardly eat anything, every day.", "I eat almost nothing nearly every day."],
    ],
    "Failure": [
        ["I feel good about myself.", "I'm proud of what I've achieved."],
        ["Sometimes I feel I let people down.", "Occasionally I doubt myself."],
        ["I often feel like a failure.", "Most days I feel I've let my family down."],
        ["I feel worthless and like a total failure every day.", "Every day I feel I am a failure."],
    ],
    "Concentrating": [
        ["I can focus on my work without trouble.", "Reading and concentrating are easy for me."],
        ["Sometimes my mind wanders when I read.", "A few days I have trouble focusing."],
        ["I often can't concentrate on anything.", "Most days I can't follow a TV show."],
        ["I can't concentrate at all, every day.", "My mind is foggy nearly every day, I can't focus."],
    ],
    "Moving": [
        ["People say I seem my usual self.", "Nobody noticed any change in how I move or talk."],
        ["Sometimes I feel a bit restless.", "Once in a while I talk slower than usual."],
        ["People noticed I move and talk slowly most days.", "I'm fidgety and restless more days than not."],
        ["I move and speak so slowly every day that everyone notices.", "I'm restless and can't sit still all day, every day."],
    ],
}

ELLIE_QUESTIONS: dict[str, str] = {
    "NoInterest": "What do you enjoy doing these days?",
    "Depressed": "How have you been feeling lately?",
    "Sleep": "How easy is it for you to get a good night's sleep?",
    "Tired": "How is your energy level?",
    "Appetite": "How has your appetite been?",
    "Failure": "How do you feel about yourself?",
    "Concentrating": "Do you find it hard to concentrate?",
    "Moving": "Have people noticed any change in how you move or talk?",
}

FILLER_EN = [
    "I live in Los Angeles.", "I work in an office downtown.", "I grew up in a small town.",
    "I have a younger brother.", "I studied business in college.", "I like the weather here.",
    "I drive to work every morning.", "My last vacation was two years ago.",
]

ZH: dict[str, list[list[str]]] = {
    "NoInterest": [["我对很多事情都很有兴趣。"], ["有几天我对爱好提不起兴趣。"], ["大多数时候我对什么都没兴趣。"], ["我几乎每天对任何事都没有兴趣。"]],
    "Depressed": [["我心情很好。"], ["偶尔会有点情绪低落。"], ["一半以上的日子我都很沮丧。"], ["我几乎每天都感到绝望。"]],
    "Sleep": [["我睡得很好。"], ["有几天晚上睡不着。"], ["一半以上的晚上我都失眠。"], ["我几乎每天晚上都睡不着。"]],
    "Tired": [["我精力充沛。"], ["有几天会觉得累。"], ["大多数日子我都很疲惫。"], ["我几乎每天都筋疲力尽。"]],
    "Appetite": [["我的胃口正常。"], ["偶尔没有胃口。"], ["大多数日子我都吃不下饭。"], ["我几乎每天都吃不下东西。"]],
    "Failure": [["我对自己很满意。"], ["有时觉得让家人失望了。"], ["我经常觉得自己很失败。"], ["我几乎每天都觉得自己一无是处。"]],
    "Concentrating": [["我注意力很集中。"], ["有几天难以集中注意力。"], ["我经常无法集中精神。"], ["我几乎每天都无法集中注意力。"]],
    "Moving": [["别人没发现我有什么变化。"], ["有时候有点坐立不安。"], ["别人常说我说话很慢。"], ["我几乎每天都动作迟缓，大家都注意到了。"]],
    "SelfHarm": [["我从来没有伤害自己的想法。"], ["偶尔会有消极的念头。"], ["一半以上的日子我想过伤害自己。"], ["我几乎每天都想到死。"]],
}
FILLER_ZH = ["我住在上海。", "我在一家公司上班。", "我有一个妹妹。", "我喜欢这里的天气。"]
